"""NYU Depth V2 (Silberman et al., ECCV 2012) in the two forms people have.

(a) A folder of RGB/depth PNG pairs listed by CSV files (the widely shared "nyu_data" release, as used by
    DenseDepth): nyu_train.csv / nyu_test.csv (or nyu2_*.csv), at the root or in data/, with lines
    "rgb_path,depth_path" relative to the root (or to the CSV's folder). Depth PNGs are decoded by bit depth:
    8-bit means 0..255 -> 0..10 m (the train set), 16-bit means millimetres (the test set).
(b) The official labeled file nyu_depth_v2_labeled.mat (MATLAB v7.3 = HDF5, read with h5py): "images"
    (N, 3, W, H) uint8 and "depths" (N, W, H) metres as h5py sees them (MATLAB is column-major), i.e.
    transposed: each image is transposed back to (3, H, W) = (3, 480, 640). Any W, H is accepted.

Split of the labeled file. The standard split is 795 train / 654 test images by scene, published as
splits.mat (trainNdxs, testNdxs, 1-based) with the NYU toolbox; pass it as `splits=` (v5 or v7.3 .mat, or a
dict {"train": [...], "test": [...]} of 1-based indices). The official index list is not reproduced here
(it is not derivable from the file). Without `splits`, a deterministic *substitute* split is used and a
warning is logged: whole scenes (the file's "scenes" names) are ordered by CRC32 of their name and the
first ones go to test until 654/1449 of the images are test (without scene names: a fixed permutation of
the indices, seed 0). Numbers on it are not comparable with published ones. NYU has no val split: "val" is
the test split for both forms (unless a nyu_val.csv exists).

Items are the depth kind of data/common.depth_item. The full frame is resized to S×S (no crop: the 4:3
frame is squeezed, so that the Eigen crop, given in 640×480 coordinates, scales to S×S exactly): RGB
bilinear with antialiasing, depth by data/common.resize_depth ("area": mean of the valid depths; or
"nearest"); the train split flips image and depth together (one coin from torch's global generator).
size=N keeps the first N items of the split (as for the built-in data sets, whose size is their length).
"""
from __future__ import annotations

import csv
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from .common import (MAX_DEPTH_M, check_image_size, check_split, depth_item, resize_depth, resize_rgb,
                     uint8_to_unit)

log = logging.getLogger("diffusion_ext.data")

OFFICIAL_TRAIN, OFFICIAL_TEST = 795, 654
CSV_NAMES = ("nyu_{}.csv", "nyu2_{}.csv")


def find_csv(root: Path, split: str) -> Path | None:
    """The CSV of a split below root (root/ or root/data/), "val" falling back to "test"."""
    for name in ([split] if split != "val" else ["val", "test"]):
        for folder in (root, root / "data"):
            for pattern in CSV_NAMES:
                if (folder / pattern.format(name)).is_file():
                    return folder / pattern.format(name)
    return None


def decode_depth_png(path) -> np.ndarray:
    """A depth PNG -> (H, W) float32 metres: 8-bit is 0..255 -> 0..10 m, 16-bit is millimetres."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:   # some copies store the 8-bit depth as grey RGB
        arr = arr[..., 0]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) * (MAX_DEPTH_M / 255.0)
    if arr.dtype in (np.uint16, np.int32, np.uint32, np.int16):
        return arr.astype(np.float32) / 1000.0
    raise ValueError(f"NYUCsvDataset: depth PNG {str(path)!r} has unsupported pixel type {arr.dtype}")


def _finish(rgb: torch.Tensor, depth_m: np.ndarray, image_size: int, depth_resize: str, flip: bool) -> dict:
    """(3, H, W) in [-1, 1] and (H, W) metres -> the item at image_size (with a paired flip)."""
    if rgb.shape[-2:] != depth_m.shape:
        raise ValueError(f"NYU: image is {tuple(rgb.shape[-2:])} but depth is {depth_m.shape}")
    d = torch.from_numpy(np.ascontiguousarray(depth_m, dtype=np.float32))[None]
    valid = (d > 1e-3) & (d <= MAX_DEPTH_M) & torch.isfinite(d)
    d = torch.where(valid, d, torch.zeros_like(d))
    rgb = resize_rgb(rgb, image_size)
    d, valid = resize_depth(d, valid, image_size, depth_resize)
    if flip and torch.rand(()) < 0.5:
        rgb, d, valid = rgb.flip(-1), d.flip(-1), valid.flip(-1)
    return depth_item(rgb, d, valid)


class _NYUBase(torch.utils.data.Dataset):
    kind = "depth"
    num_classes = None

    def _limit(self, items, size, where):
        """The first `size` items (None: all), e.g. for a quick run."""
        if size is None:
            return items
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{where}: size must be a positive int or None, got {size!r}")
        return items[:size]

    def _setup(self, image_size, split, depth_resize, flip, where):
        self.image_size = check_image_size(image_size, where)
        self.split = check_split(split, where)
        if depth_resize not in ("area", "nearest"):
            raise ValueError(f"{where}: depth_resize must be 'area' or 'nearest', got {depth_resize!r}")
        self.depth_resize = depth_resize
        self.flip = (split == "train") if flip is None else bool(flip)


class NYUCsvDataset(_NYUBase):
    """NYU Depth V2 as a folder of PNG pairs listed by nyu_<split>.csv (see the module docstring)."""

    def __init__(self, root, image_size: int = 64, split: str = "train", csv_file=None, depth_resize: str = "area",
                 flip: bool | None = None, seed: int = 0, size: int | None = None):
        self._setup(image_size, split, depth_resize, flip, "NYUCsvDataset")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"NYUCsvDataset: {str(root)!r} is not a folder")
        path = Path(csv_file).expanduser() if csv_file is not None else find_csv(self.root, split)
        if path is None or not path.is_file():
            looked = " or ".join(p.format(split) for p in CSV_NAMES)
            raise FileNotFoundError(f"NYUCsvDataset: no CSV for split {split!r}: {str(path) if path else looked} "
                                    f"not found in {str(self.root)!r} or its data/ folder")
        self.csv_path = path
        self.pairs = []
        with open(path, newline="") as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) != 2:
                    raise ValueError(f"NYUCsvDataset: {str(path)}:{lineno}: expected 'rgb_path,depth_path', got {row!r}")
                self.pairs.append(tuple(self._resolve(p.strip()) for p in row))
        if not self.pairs:
            raise ValueError(f"NYUCsvDataset: {str(path)!r} lists no image pairs")
        self.pairs = self._limit(self.pairs, size, "NYUCsvDataset")
        for p in self.pairs[0]:   # a cheap check that the paths resolve; every file is checked when read
            if not p.is_file():
                raise FileNotFoundError(f"NYUCsvDataset: {str(p)!r}, listed in {str(path)!r}, not found")

    def _resolve(self, rel: str) -> Path:
        for base in (self.root, self.csv_path.parent):
            if (base / rel).exists():
                return base / rel
        return self.root / rel

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        rgb_path, depth_path = self.pairs[index]
        with Image.open(rgb_path) as im:
            rgb = uint8_to_unit(np.asarray(im.convert("RGB")))
        return _finish(rgb, decode_depth_png(depth_path), self.image_size, self.depth_resize, self.flip)


def load_splits(splits) -> dict[str, np.ndarray]:
    """splits.mat (v5 or v7.3) or {"train": [...], "test": [...]} (1-based) -> 0-based index arrays."""
    if isinstance(splits, dict):
        raw = {"train": splits["train"], "test": splits["test"]}
    else:
        path = Path(splits).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"NYUMatDataset: splits file {str(splits)!r} not found")
        with open(path, "rb") as f:
            head = f.read(8)
        if head.startswith(b"\x89HDF") or head.startswith(b"MATLAB 7.3"):
            import h5py

            with h5py.File(path, "r") as f:
                raw = {k: f[v][()] for k, v in (("train", "trainNdxs"), ("test", "testNdxs")) if v in f}
        else:
            from .matv5 import read_mat_v5

            m = read_mat_v5(path)
            raw = {k: m[v] for k, v in (("train", "trainNdxs"), ("test", "testNdxs")) if v in m}
        if set(raw) != {"train", "test"}:
            raise ValueError(f"NYUMatDataset: splits file {str(path)!r} needs variables trainNdxs and testNdxs")
    return {k: np.asarray(v).astype(np.int64).ravel() - 1 for k, v in raw.items()}


def substitute_split(n: int, scenes: list[str] | None) -> dict[str, np.ndarray]:
    """The deterministic stand-in for the official split (see the module docstring)."""
    n_test = round(n * OFFICIAL_TEST / (OFFICIAL_TRAIN + OFFICIAL_TEST))
    if scenes is not None:
        order = sorted(set(scenes), key=lambda s: (zlib.crc32(s.encode()), s))
        test_scenes, count = set(), 0
        for s in order:
            if count >= n_test:
                break
            test_scenes.add(s)
            count += scenes.count(s)
        is_test = np.array([s in test_scenes for s in scenes])
    else:
        is_test = np.zeros(n, dtype=bool)
        is_test[np.random.default_rng(0).permutation(n)[:n_test]] = True
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


class NYUMatDataset(_NYUBase):
    """NYU Depth V2 from the official labeled .mat (HDF5); see the module docstring for the split."""

    def __init__(self, path, image_size: int = 64, split: str = "train", splits=None, depth_resize: str = "area",
                 flip: bool | None = None, seed: int = 0, size: int | None = None):
        self._setup(image_size, split, depth_resize, flip, "NYUMatDataset")
        import h5py

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"NYUMatDataset: {str(path)!r} not found")
        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise ValueError(f"NYUMatDataset: {str(path)!r} is not an HDF5 (MATLAB v7.3) file: {e}") from e
        with f:
            for key in ("images", "depths"):
                if key not in f:
                    raise ValueError(f"NYUMatDataset: {str(path)!r} has no {key!r} dataset (found {sorted(f.keys())})")
            im, dp = f["images"], f["depths"]
            if im.ndim != 4 or im.shape[1] != 3 or dp.ndim != 3 or dp.shape != (im.shape[0],) + im.shape[2:]:
                raise ValueError(f"NYUMatDataset: {str(path)!r}: expected images (N, 3, W, H) and depths (N, W, H) "
                                 f"as h5py reads them, got images {im.shape} and depths {dp.shape}")
            if im.dtype != np.uint8:
                raise ValueError(f"NYUMatDataset: {str(path)!r}: images must be uint8, got {im.dtype}")
            n = im.shape[0]
            scenes = self._scenes(f, n)
        if splits is not None:
            table = load_splits(splits)
        else:
            table = substitute_split(n, scenes)
            log.warning("NYUMatDataset: no splits file given; using a deterministic substitute split (%s), "
                        "not the official 795/654 one: pass splits='splits.mat' for published numbers",
                        "by scene" if scenes is not None else "by index")
        idx = table["test" if split == "val" else split]
        if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"NYUMatDataset: split {split!r} indices must be non-empty and within 1..{n} (1-based)")
        self.indices = self._limit(idx, size, "NYUMatDataset")
        self._file, self._pid = None, None

    @staticmethod
    def _scenes(f, n: int) -> list[str] | None:
        """The "scenes" names (MATLAB cell of char arrays: HDF5 references to uint16 codes), if present."""
        if "scenes" not in f:
            return None
        refs = np.asarray(f["scenes"]).ravel()
        if refs.size != n:
            return None
        try:
            return ["".join(map(chr, np.asarray(f[r]).ravel())) for r in refs]
        except Exception:  # noqa: BLE001  (an unexpected layout: fall back to the index split)
            return None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        if self._file is None or self._pid != os.getpid():   # one handle per DataLoader worker
            import h5py

            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        i = int(self.indices[index])
        rgb = uint8_to_unit(np.asarray(self._file["images"][i]).transpose(2, 1, 0))   # (W, H, 3)ᵀ -> (H, W, 3)
        depth = np.asarray(self._file["depths"][i], dtype=np.float32).T                # (W, H) -> (H, W)
        return _finish(rgb, depth, self.image_size, self.depth_resize, self.flip)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None   # h5py handles do not pickle
        return state
