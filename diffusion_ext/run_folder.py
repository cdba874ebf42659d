"""A training run's folder is the run's identity: what it holds, a one-line description of it, and the
rules that keep a second run from destroying a first.

- A new run refuses a folder that already holds a run (any of RUN_FILES), naming it and the ways on:
  `--resume`, another `--out`, or `--overwrite`, which moves the old folder aside (never deletes it).
- A resumed run lives wherever its folder is now: the `out` recorded in the checkpoint (as it was typed,
  perhaps relative, perhaps on another machine) is not compared; the configuration that shapes training
  is (config_differences), and every real difference is named with both values.
"""
from __future__ import annotations

import os
import time

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
# the files a run writes into its folder (train.py); one of them present means the folder holds a run
RUN_FILES = (CHECKPOINT_NAME, "config.json", LOG_NAME, "weights.pt", "weights.safetensors", "loss.png", "samples")


def run_files(folder: str) -> list[str]:
    """The run files present in `folder` (none if it is not a folder)."""
    if not os.path.isdir(folder):
        return []
    return [name for name in RUN_FILES if os.path.exists(os.path.join(folder, name))]


def written_at(ckpt: dict | None, path: str) -> str:
    """When a checkpoint was written, local time: the time it records (kept by a copy), else the file's."""
    ts = (ckpt or {}).get("written_at")
    if ts is None:
        try:
            ts = os.path.getmtime(path)
        except OSError:
            return "at an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def describe_run(folder: str) -> str:
    """'checkpoint at step N of M, written <time>' for a folder with a readable checkpoint, else the list
    of its run files (a run that stopped before its first checkpoint, or a foreign file)."""
    path = os.path.join(folder, CHECKPOINT_NAME)
    if os.path.isfile(path):
        try:
            import torch

            # mmap: only the small pickle of plain values is read, not gigabytes of tensors
            ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return f"checkpoint at step {ck['step']} of {ck['config']['steps']}, written {written_at(ck, path)}"
        except Exception:  # noqa: BLE001  (a torn or foreign file: say what is there instead)
            pass
    return "its files: " + ", ".join(run_files(folder))


def aside_name(folder: str) -> str:
    """A free name beside `folder` for the old run: <folder>.old-<YYYYmmdd-HHMMSS>[-k]."""
    base = f"{os.path.normpath(folder)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    name, k = base, 2
    while os.path.exists(name):
        name, k = f"{base}-{k}", k + 1
    return name


def prepare_new_run(folder: str, overwrite: bool, main: bool = True, command: str = "train") -> str | None:
    """Checks that a new run may write into `folder` before any work starts; with `overwrite`, moves an
    old run aside (on the main process only). Returns where the old run went, or None."""
    from .out_paths import check_out_dir

    check_out_dir(folder, f"{command}: --out")
    if not run_files(folder):
        return None
    if not overwrite:
        resume = f"continue it with --resume --out {folder}, " if command == "train" else ""
        raise ValueError(
            f"{command}: --out {folder} already holds a run ({describe_run(folder)}); nothing was changed. "
            f"To keep it, {resume}or write into another folder with --out DIR; or pass --overwrite to move it "
            f"aside to {os.path.normpath(folder)}.old-<time> and start afresh")
    if not main:
        return None
    aside = aside_name(folder)
    os.rename(folder, aside)
    return aside


def _normalised(name: str, value):
    if isinstance(value, list):
        value = tuple(value)
    if name in ("data", "vae") and isinstance(value, str) and value and not value.startswith("builtin:"):
        value = os.path.realpath(os.path.expanduser(value))  # the same folder, however it is spelt
    return value


def config_differences(saved: dict, given: dict, defaults: dict, may_change: tuple[str, ...]) -> list[str]:
    """'name: X in the checkpoint, Y given' for every option in `given` that shapes training (not in
    may_change, not `out`) and differs from the checkpoint's value (its default if the checkpoint is older
    than the option)."""
    out = []
    for name in sorted(given):
        if name in may_change or name == "out" or name not in defaults:
            continue
        was, now = _normalised(name, saved.get(name, defaults[name])), _normalised(name, given[name])
        if was != now:
            out.append(f"{name}: {was!r} in the checkpoint, {now!r} given")
    return out
