"""Helpers shared by the data sets: the depth <-> [-1, 1] map, image -> tensor, resizing, split names."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Depth is stored in metres and fed to the network linearly mapped from [0, MAX_DEPTH_M] to [-1, 1]
# (NYU Depth V2's Kinect range is about 0.5..10 m; the train PNGs of the common CSV release encode 0..10 m).
MAX_DEPTH_M = 10.0
# A ground-truth depth counts as valid in (MIN_VALID_DEPTH_M, MAX_DEPTH_M]; 0 marks a Kinect hole.
MIN_VALID_DEPTH_M = 1e-3

SPLITS = ("train", "val", "test")


def check_split(split: str, where: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"{where}: split must be one of {SPLITS}, got {split!r}")
    return split


def check_image_size(image_size: int, where: str) -> int:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"{where}: image_size must be a positive int, got {image_size!r}")
    return image_size


def depth_to_unit(depth_m: torch.Tensor) -> torch.Tensor:
    """Metres in [0, 10] -> [-1, 1] (linear; values outside are clamped)."""
    return depth_m.clamp(0.0, MAX_DEPTH_M) * (2.0 / MAX_DEPTH_M) - 1.0


def unit_to_depth(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> metres in [0, 10], the inverse of depth_to_unit (x is clamped to [-1, 1] first)."""
    return (x.clamp(-1.0, 1.0) + 1.0) * (MAX_DEPTH_M / 2.0)


def uint8_to_unit(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    if not (rgb.flags.writeable and rgb.flags.c_contiguous):   # Pillow's arrays are read-only views
        rgb = np.array(rgb, order="C")
    t = torch.from_numpy(rgb).permute(2, 0, 1).float()
    return t.div_(127.5).sub_(1.0)


def resize_rgb(img: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) float -> (3, size, size), bilinear with antialiasing (a box-like low-pass when shrinking)."""
    if img.shape[-2:] == (size, size):
        return img
    out = F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.clamp_(-1.0, 1.0)


def resize_depth(depth_m: torch.Tensor, valid: torch.Tensor, size: int, mode: str = "area"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, H, W) metres and validity -> (1, size, size) each.

    "area": the mean of the valid depths in each output cell (invalid pixels neither count nor pull the
    mean towards 0); the cell is valid when at least half of it was valid. "nearest": the nearest pixel,
    validity with it (no new depth values are invented at object boundaries).
    """
    if mode not in ("area", "nearest"):
        raise ValueError(f"resize_depth: mode must be 'area' or 'nearest', got {mode!r}")
    if depth_m.shape[-2:] == (size, size):
        return depth_m, valid
    if mode == "nearest":
        d = F.interpolate(depth_m[None], size=(size, size), mode="nearest-exact")[0]
        v = F.interpolate(valid[None].float(), size=(size, size), mode="nearest-exact")[0] > 0.5
        return d * v, v
    v = valid.float()
    num = F.adaptive_avg_pool2d((depth_m * v)[None], (size, size))[0]
    den = F.adaptive_avg_pool2d(v[None], (size, size))[0]
    d = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))
    ok = den >= 0.5
    return d * ok, ok


def depth_item(rgb: torch.Tensor, depth_m: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
    """The item dict of every depth data set: image (3,S,S) in [-1,1], depth (1,S,S) in [-1,1],
    depth_m (1,S,S) metres, valid (1,S,S) bool (ground truth in (1e-3, 10] m, and `valid` if given)."""
    ok = (depth_m > MIN_VALID_DEPTH_M) & (depth_m <= MAX_DEPTH_M) & torch.isfinite(depth_m)
    if valid is not None:
        ok &= valid
    depth_m = torch.where(ok, depth_m, torch.zeros_like(depth_m)).float()
    return {"image": rgb.float().contiguous(), "depth": depth_to_unit(depth_m).contiguous(),
            "depth_m": depth_m.contiguous(), "valid": ok.contiguous()}


def item_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """A generator for item `index` of a built-in data set: independent of every other item, so items can
    be made in any order, by any worker, and are the same on every machine (numpy's PCG64 + SeedSequence)."""
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, SPLITS.index(split), index, stream]))
