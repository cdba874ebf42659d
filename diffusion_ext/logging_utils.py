"""The trainer's logs: a JSONL file (one JSON object per line) and a tqdm progress bar."""
from __future__ import annotations

import json
import os
import sys


class JsonlLog:
    """Appends one JSON object per line, flushed at once so that a crash loses at most the last line.

    On resume from step s the records of steps > s (written after that checkpoint by the run that
    stopped) are dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            kept = [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL file; a torn last line (a crash mid-write) is skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def write(self, msg: str) -> None:
        print(msg, file=sys.stderr)

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train"):
    """tqdm on stderr when enabled and stderr is a terminal (it shows it/s itself); else a no-op."""
    if not enabled or not sys.stderr.isatty():
        return NullBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return NullBar()
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
