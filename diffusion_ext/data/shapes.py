"""builtin:shapes — one coloured shape on a plain background, made from a seed; and the checker of samples.

Each image is a plain background of one palette colour with one shape (circle, square or upright triangle,
the class label) of another palette colour. Pixels are exactly palette colours (hard edges, no
antialiasing), so a member is easy to recognise: that is what makes the data set useful to test a
sampler — a tiny DDPM trained for minutes on CPU at 16×16 or 32×32 should make mostly valid members, and
`valid_fraction` measures it.

The checker (is_valid_shape_image) asks what a person would: is the border one palette colour (the
background), is there one other palette colour covering a plausible area, is it one compact blob (one
connected component filling a fair part of its bounding box), and is little else there (pixels far from
every palette colour — edges blurred by the sampler, noise — or of a third colour), and are the edges
sharp (a band at most about one pixel wide between the two colours)? Gaussian noise fails the border
test, blends of two members the "little else" test, blurred images (Gaussian σ ≳ 0.75 px) the edge test.
"""
from __future__ import annotations

import numpy as np
import torch

from .common import check_image_size, check_split, item_rng

# Six well-separated colours (RGB in [0, 1]; the smallest pairwise distance is 0.75): few colours make
# the data set easy to learn, separation makes the checker unambiguous.
PALETTE = np.array([
    [0.90, 0.10, 0.10],  # red
    [0.10, 0.80, 0.20],  # green
    [0.15, 0.25, 0.90],  # blue
    [0.95, 0.85, 0.10],  # yellow
    [0.95, 0.95, 0.95],  # white
    [0.10, 0.10, 0.12],  # near black
], dtype=np.float32)
SHAPES = ("circle", "square", "triangle")
# Half-extent of a shape as a fraction of the image side: large enough to be many pixels at 16×16.
MIN_HALF, MAX_HALF = 0.22, 0.36

# Checker thresholds (fractions of pixels unless said otherwise); see is_valid_shape_image.
COLOR_TOL = 0.3          # a pixel "is" a palette colour within this RGB distance ([0, 1] scale)
BORDER_BG_MIN = 0.75     # of the one-pixel border ring that must be the background colour
OTHER_MAX = 0.12         # pixels far from every palette colour (blurred edges, noise)
THIRD_COLOR_MAX = 0.05   # pixels of a palette colour that is neither background nor shape
AREA_MIN, AREA_MAX = 0.04, 0.65   # shape area (a triangle at MIN_HALF is 0.097, a square at MAX_HALF 0.518)
COMPONENT_MIN = 0.9      # of the shape pixels in its largest 4-connected component
FILL_MIN = 0.35          # component area / bounding-box area (triangle 0.5, circle 0.785, square 1)
BAND_MAX = 1.25          # mean width in pixels of the edge band between background and shape colour


def render_shape(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, int]:
    """(H, W, 3) float32 in [0, 1] and the shape class, drawn from rng."""
    S = image_size
    bg, fg = rng.choice(len(PALETTE), size=2, replace=False)
    kind = int(rng.integers(len(SHAPES)))
    half = rng.uniform(MIN_HALF, MAX_HALF) * S
    # centre such that the shape stays at least half a pixel inside the image (the border is background)
    lo, hi = half + 0.5, S - half - 0.5
    cx, cy = (rng.uniform(lo, hi, size=2) if hi > lo else np.array([S / 2, S / 2]))
    y, x = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5   # pixel centres
    dx, dy = x - cx, y - cy
    if kind == 0:
        inside = dx * dx + dy * dy <= half * half
    elif kind == 1:
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:   # apex (cx, cy - half), base from (cx - half, cy + half) to (cx + half, cy + half)
        inside = (dy <= half) & (2.0 * np.abs(dx) <= dy + half)
    img = np.where(inside[..., None], PALETTE[fg], PALETTE[bg]).astype(np.float32)
    return img, kind


class ShapesDataset(torch.utils.data.Dataset):
    """`size` items {"image": (3, S, S) float32 in [-1, 1], "label": int64 shape class}; item i depends only
    on (seed, split, i)."""

    kind = "image"
    num_classes = len(SHAPES)

    def __init__(self, size: int | None = None, image_size: int = 64, split: str = "train", seed: int = 0):
        self.split = check_split(split, "builtin:shapes")
        self.image_size = check_image_size(image_size, "builtin:shapes")
        self.size = (10_000 if split == "train" else 1_000) if size is None else int(size)
        if self.size < 1:
            raise ValueError(f"builtin:shapes: size must be >= 1, got {size!r}")
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not -self.size <= index < self.size:
            raise IndexError(f"builtin:shapes: index {index} out of range for {self.size} items")
        img, kind = render_shape(item_rng(self.seed, self.split, index % self.size), self.image_size)
        x = torch.from_numpy(img).permute(2, 0, 1).mul(2.0).sub(1.0).contiguous()
        return {"image": x, "label": torch.tensor(kind, dtype=torch.int64)}


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean (H, W) mask (iterative flood fill; images are small)."""
    H, W = mask.shape
    labels = np.zeros((H, W), dtype=np.int32)
    best, best_n, current = 0, 0, 0
    for sy, sx in zip(*np.nonzero(mask)):
        if labels[sy, sx]:
            continue
        current += 1
        labels[sy, sx] = current
        stack, n = [(sy, sx)], 0
        while stack:
            yy, xx = stack.pop()
            n += 1
            for ny, nx in ((yy - 1, xx), (yy + 1, xx), (yy, xx - 1), (yy, xx + 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if n > best_n:
            best, best_n = current, n
    return labels == best


def is_valid_shape_image(img: torch.Tensor) -> bool:
    """Whether a (3, S, S) image in [-1, 1] looks like a member of builtin:shapes (see the module docstring
    for the tests and the thresholds above)."""
    if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3 or img.shape[1] < 4 or img.shape[2] < 4:
        shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f"is_valid_shape_image: img must be a (3, S, S) tensor with S >= 4, got {shape}")
    rgb = ((img.detach().float().cpu().numpy().transpose(1, 2, 0) + 1.0) * 0.5)   # (H, W, 3) in [0, 1]
    if not np.isfinite(rgb).all():
        return False
    H, W = rgb.shape[:2]
    n = H * W
    dist = np.linalg.norm(rgb[:, :, None, :] - PALETTE[None, None], axis=-1)   # (H, W, P)
    nearest = dist.argmin(-1)
    matched = np.take_along_axis(dist, nearest[..., None], -1)[..., 0] <= COLOR_TOL
    colour = np.where(matched, nearest, -1)      # palette index, or -1 for "no palette colour"
    # 1. background: the colour of most of the border ring
    ring = np.concatenate([colour[0], colour[-1], colour[1:-1, 0], colour[1:-1, -1]])
    counts = np.bincount(ring[ring >= 0], minlength=len(PALETTE))
    bg = int(counts.argmax())
    if counts[bg] < BORDER_BG_MIN * ring.size:
        return False
    # 2. the shape colour: the most common other palette colour, covering a plausible area
    inner = np.bincount(colour[colour >= 0], minlength=len(PALETTE)).astype(np.int64)
    inner[bg] = 0
    fg = int(inner.argmax())
    area = inner[fg] / n
    if not AREA_MIN <= area <= AREA_MAX:
        return False
    # 3. little else: unmatched pixels and a third colour
    if (colour < 0).sum() / n > OTHER_MAX or (inner.sum() - inner[fg]) / n > THIRD_COLOR_MAX:
        return False
    # 4. sharp edges: the pixels a fraction 0.2..0.8 of the way from background to shape colour form a
    # band along the outline; its width (band pixels per outline pixel) is 0 for a member and about 1.7·σ
    # for a Gaussian blur of σ pixels, whatever the colours (a pair of close colours hides a blur from 3.).
    # A 3×3 median first removes pixel noise, which keeps edges (and a blur) as they are.
    a, b = PALETTE[bg], PALETTE[fg]
    alpha = ((rgb - a) @ (b - a)) / float((b - a) @ (b - a))
    alpha = np.median(np.lib.stride_tricks.sliding_window_view(np.pad(alpha, 1, mode="edge"), (3, 3)), axis=(-2, -1))
    band = ((alpha > 0.2) & (alpha < 0.8)).sum()
    inside = np.pad(alpha >= 0.5, 1, mode="edge")
    core = inside[1:-1, 1:-1]
    outline = core & ~(inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:])
    if band > BAND_MAX * max(int(outline.sum()), 1):
        return False
    # 5. one compact blob
    mask = colour == fg
    comp = _largest_component(mask)
    k = int(comp.sum())
    if k < COMPONENT_MIN * mask.sum():
        return False
    ys, xs = np.nonzero(comp)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return k / box >= FILL_MIN


def valid_fraction(images: torch.Tensor) -> float:
    """The fraction of a batch (B, 3, S, S) in [-1, 1] that is_valid_shape_image accepts."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"valid_fraction: images must be a non-empty (B, 3, S, S) tensor, got {shape}")
    return sum(is_valid_shape_image(x) for x in images) / images.shape[0]
