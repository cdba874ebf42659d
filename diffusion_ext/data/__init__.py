"""Data sets of diffusion_ext: build_dataset(spec) gives a torch Dataset of dicts of tensors.

spec is one of
    builtin:shapes          coloured shapes (class = shape kind), no download        (data/shapes.py)
    builtin:depth-scenes    ray-cast rooms with exact depth, no download            (data/depth_scenes.py)
    a .mat / .h5 file       NYU Depth V2 labeled file (HDF5)                        (data/nyu.py)
    a folder with nyu_*.csv NYU Depth V2 PNG pairs                                  (data/nyu.py)
    any other folder        JPEG/PNG images, e.g. CelebA's img_align_celeba         (data/image_folder.py)
Image data sets give {"image": (3, S, S) in [-1, 1]} (+ "label" int64 with classes); depth data sets give
{"image", "depth" in [-1, 1], "depth_m" metres, "valid" bool}. Every data set has `kind` ("image" |
"depth") and `num_classes` (int or None). Extra keyword arguments go to the data set's constructor.
"""
from __future__ import annotations

from pathlib import Path

from .common import MAX_DEPTH_M, depth_to_unit, unit_to_depth  # noqa: F401
from .depth_scenes import DepthScenesDataset
from .image_folder import ImageFolderDataset
from .nyu import NYUCsvDataset, NYUMatDataset, find_csv
from .shapes import ShapesDataset, is_valid_shape_image, valid_fraction  # noqa: F401

BUILTIN = {"shapes": ShapesDataset, "depth-scenes": DepthScenesDataset}
MAT_SUFFIXES = (".mat", ".h5", ".hdf5")

__all__ = ["build_dataset", "ShapesDataset", "DepthScenesDataset", "ImageFolderDataset", "NYUCsvDataset",
           "NYUMatDataset", "is_valid_shape_image", "valid_fraction", "depth_to_unit", "unit_to_depth",
           "MAX_DEPTH_M", "BUILTIN"]


def build_dataset(spec: str, image_size: int = 64, split: str = "train", seed: int = 0, **kw):
    """The data set named by spec (see the module docstring); builtins take size=N (default 10,000 for
    train, 1,000 otherwise); image folders take max_bad_fraction (the most unreadable files allowed)."""
    cls, source = _resolve(spec)
    if "max_bad_fraction" in kw and cls is not ImageFolderDataset:
        raise ValueError(f"build_dataset: max_bad_fraction (--max-bad-fraction) applies to folders of JPEG/PNG "
                         f"images, whose unreadable files are skipped; {str(spec)!r} is a {cls.__name__}")
    return cls(source, image_size=image_size, split=split, seed=seed, **kw) if source is not None else \
        cls(image_size=image_size, split=split, seed=seed, **kw)


def _resolve(spec) -> tuple[type, Path | None]:
    """(data set class, its path; None for a builtin) of a spec, or a clear error."""
    if not isinstance(spec, (str, Path)) or not str(spec):
        raise ValueError(f"build_dataset: spec must be 'builtin:<name>' or a path, got {spec!r}")
    text = str(spec)
    if text.startswith("builtin:"):
        name = text[len("builtin:"):]
        if name not in BUILTIN:
            raise ValueError(f"build_dataset: unknown built-in data set {text!r}; "
                             f"choose one of {', '.join('builtin:' + b for b in BUILTIN)}")
        return BUILTIN[name], None
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"build_dataset: {text!r} does not exist (and is not 'builtin:<name>', "
                                f"one of {', '.join('builtin:' + b for b in BUILTIN)})")
    if path.is_file():
        if path.suffix.lower() in MAT_SUFFIXES:
            return NYUMatDataset, path
        raise ValueError(f"build_dataset: {text!r} is a file but not a NYU Depth V2 .mat/.h5; give a folder of "
                         f"images, a NYU folder with nyu_train.csv/nyu_test.csv, a .mat file, or builtin:<name>")
    if find_csv(path, "train") is not None or find_csv(path, "test") is not None:
        return NYUCsvDataset, path
    return ImageFolderDataset, path
