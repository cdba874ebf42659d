"""Image folders: any tree of JPEG/PNG files (CelebA's img_align_celeba, FFHQ thumbnails, your photos).

Items are {"image": (3, S, S) float32 in [-1, 1]}: centre crop to a square (or to `crop` pixels first, as
many CelebA pipelines crop 140×140 of the 178×218 faces), resize to S with Pillow's antialiased bicubic
filter, random horizontal flip for the train split.

Validation is cheap and lazy. At construction every file's first bytes are checked against the PNG/JPEG
signatures (one small read per file, no decoding: a few seconds for CelebA's 202,599 files); empty files,
truncated headers and non-images are skipped and counted in the log. Decoding happens in __getitem__; a
file that fails to decode there (e.g. truncated data) is logged, remembered, and replaced by the next
readable file, so one bad file never stops a long training run. If more than `max_bad_fraction` of the
files are bad (at construction, or counted while reading), a ValueError names some of them.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from .common import check_image_size, check_split, uint8_to_unit

log = logging.getLogger("diffusion_ext.data")

EXTENSIONS = (".jpg", ".jpeg", ".png")
PARTITION_FILE = "list_eval_partition.txt"
# CelebA's list_eval_partition.txt: "<file name> <0|1|2>" with 0 train, 1 val, 2 test.
PARTITION_CODES = {"train": 0, "val": 1, "test": 2}
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
SIZE_SAMPLE = 64     # image headers read at construction to compare the images' size with image_size
SMALL_FACTOR = 2     # an image "much smaller" than image_size is upscaled more than this


def header_ok(path: Path) -> bool:
    """Whether the file starts like a PNG or a JPEG (reads 8 bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return any(head.startswith(sig) for sig in _SIGNATURES)


def list_images(root: Path) -> list[Path]:
    """Every .jpg/.jpeg/.png below root (case-insensitive, following no hidden folders), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames
                     if f.lower().endswith(EXTENSIONS) and not f.startswith("."))
    return sorted(found)


def read_partition(path: Path) -> dict[str, int]:
    """CelebA's partition file -> {file name: 0|1|2}; a malformed line is a ValueError naming it."""
    table = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise ValueError(f"ImageFolderDataset: {path}:{lineno}: expected '<name> <0|1|2>', got {line.strip()!r}")
            table[parts[0]] = int(parts[1])
    return table


def _check_size(size) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"ImageFolderDataset: size must be a positive int or None, got {size!r}")
    return size


def _names(paths, limit: int = 5) -> str:
    paths = list(paths)
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(str(p) for p in paths[:limit]) + more


class ImageFolderDataset(torch.utils.data.Dataset):
    """The images below `root`, optionally one split of a CelebA-style partition file.

    partition: path of list_eval_partition.txt; None looks for it in root and in root's parent (CelebA's
    layout) and, if absent, every image belongs to every split. flip: None means "for the train split";
    the flip draws from torch's global generator, which DataLoader seeds differently in every worker.
    seed is accepted for build_dataset's uniform signature; the file list itself is sorted, not shuffled.
    size: keep only the first `size` files of the split (sorted by path).
    """

    kind = "image"
    num_classes = None

    def __init__(self, root, image_size: int = 64, split: str = "train", partition=None, crop: int | None = None,
                 flip: bool | None = None, max_bad_fraction: float = 0.1, seed: int = 0, size: int | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolderDataset: {str(root)!r} is not a folder")
        self.image_size = check_image_size(image_size, "ImageFolderDataset")
        self.split = check_split(split, "ImageFolderDataset")
        if crop is not None and (not isinstance(crop, int) or crop < 1):
            raise ValueError(f"ImageFolderDataset: crop must be a positive int or None, got {crop!r}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"ImageFolderDataset: max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
        self.crop, self.max_bad_fraction = crop, max_bad_fraction
        self.flip = (split == "train") if flip is None else bool(flip)

        paths = list_images(self.root)
        if not paths:
            raise ValueError(f"ImageFolderDataset: no .jpg/.jpeg/.png files found below {str(self.root)!r}")
        self.partition_path = self._find_partition(partition)
        if self.partition_path is not None:
            table = read_partition(self.partition_path)
            code = PARTITION_CODES[split]
            paths = [p for p in paths if table.get(p.name) == code]
            if not paths:
                raise ValueError(f"ImageFolderDataset: no image of {str(self.root)!r} is in split {split!r} "
                                 f"(code {code}) of {str(self.partition_path)!r}")
        if size is not None:   # the first `size` files (sorted), e.g. for a quick run; checked below as usual
            paths = paths[:_check_size(size)]
        bad = [p for p in paths if not header_ok(p)]
        self._check_bad(bad, len(paths), "have no PNG/JPEG header or cannot be read")
        if bad:
            log.warning("ImageFolderDataset: skipped %d of %d files of %s that are not readable PNG/JPEG: %s",
                        len(bad), len(paths), self.root, _names(bad))
            bad_set = set(bad)
            paths = [p for p in paths if p not in bad_set]
        self.paths = paths
        self.num_skipped = len(bad)
        self.bad_at_read: set[int] = set()
        self.small = self._check_sizes()

    def _check_sizes(self) -> tuple[int, int, tuple[int, int]] | None:
        """Warns when most images are much smaller than image_size (their crop would be blown up more than
        SMALL_FACTOR times: a folder of thumbnails or 1×1 icons trains a model of blur, silently).
        Reads the headers of up to SIZE_SAMPLE files spread over the folder. Returns (small, read, the
        median size as (w, h)) when it warned, else None."""
        from PIL import Image

        n = len(self.paths)
        k = min(n, SIZE_SAMPLE)
        picks = [i * n // k for i in range(k)]
        sizes = []
        for i in picks:
            try:
                with Image.open(self.paths[i]) as im:   # the header only: no decoding
                    sizes.append(im.size)
            except Exception:  # noqa: BLE001  (a bad file is __getitem__'s business)
                continue
        # the square that load() resizes to image_size: min(w, h), or the crop if smaller
        small = [wh for wh in sizes if min(*wh, self.crop or min(wh)) * SMALL_FACTOR < self.image_size]
        if not sizes or 2 * len(small) <= len(sizes):
            return None
        median = sorted(sizes, key=min)[len(sizes) // 2]
        log.warning("ImageFolderDataset: %d of %d images read below %s are smaller than 1/%d of image_size = %d "
                    "(median %d×%d px): they are blown up to %d×%d and the model learns their blur; use larger "
                    "images or a smaller --image-size", len(small), len(sizes), self.root, SMALL_FACTOR,
                    self.image_size, median[0], median[1], self.image_size, self.image_size)
        return len(small), len(sizes), median

    def _find_partition(self, partition):
        if partition is not None:
            p = Path(partition).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"ImageFolderDataset: partition file {str(partition)!r} not found")
            return p
        for folder in (self.root, self.root.parent):
            if (folder / PARTITION_FILE).is_file():
                return folder / PARTITION_FILE
        return None

    def _check_bad(self, bad, total: int, why: str, earlier: int = 0) -> None:
        if bad and len(bad) + earlier > self.max_bad_fraction * total:
            raise ValueError(f"ImageFolderDataset: {len(bad) + earlier} of {total} files below {str(self.root)!r} {why} "
                             f"(more than max_bad_fraction = {self.max_bad_fraction}): {_names(bad)}")

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        """Decode, crop, resize one image -> (3, S, S) in [-1, 1] (no flip); raises what Pillow raises."""
        from PIL import Image

        with Image.open(self.paths[index]) as im:
            im = im.convert("RGB")
        w, h = im.size
        side = min(w, h) if self.crop is None else min(self.crop, w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        im = im.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, reducing_gap=None)
        return uint8_to_unit(np.asarray(im))

    def __getitem__(self, index: int) -> dict:
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"ImageFolderDataset: index {index} out of range for {n} images")
        index %= n
        for k in range(n):
            i = (index + k) % n
            if i in self.bad_at_read:
                continue
            try:
                x = self.load(i)
                break
            except Exception as e:  # noqa: BLE001  (Pillow raises OSError, SyntaxError, ValueError, ...)
                self.bad_at_read.add(i)
                log.warning("ImageFolderDataset: skipping %s, which cannot be decoded (%s: %s); %d bad so far",
                            self.paths[i], type(e).__name__, e, len(self.bad_at_read) + self.num_skipped)
                self._check_bad([self.paths[j] for j in sorted(self.bad_at_read)], n + self.num_skipped,
                                "are bad (no PNG/JPEG header, or cannot be decoded)", self.num_skipped)
        else:
            raise ValueError(f"ImageFolderDataset: no image below {str(self.root)!r} can be decoded")
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"image": x}
