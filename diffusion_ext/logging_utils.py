"""The trainer's logs: a JSONL file (one JSON object per line), a tqdm progress bar, plain progress lines."""
from __future__ import annotations

import json
import os
import sys
import time


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

    def set_postfix(self, loss: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressLines:
    """Plain progress lines for a log file (nohup, a batch scheduler), where a progress bar is not drawn:
    'train: step 120/10000 (1.2%), loss 0.0453, 3.21 it/s, ETA 0:51:12' after the first step, then at most
    every `every_s` seconds, and at the last step. it/s is over the steps since the previous line; the
    ETA from the mean speed of this process so far."""

    def __init__(self, total: int, initial: int, every_s: float, desc: str = "train", clock=time.monotonic):
        self.total, self.n, self.first, self.every_s, self.desc, self.clock = total, initial, initial, every_s, desc, clock
        self.t0 = self.last_t = clock()
        self.last_n = initial
        self.loss = None

    def set_postfix(self, loss: float | None = None) -> None:
        self.loss = loss

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if self.n == self.first + 1 or self.n >= self.total or now - self.last_t >= self.every_s:
            self._line(now)

    def _line(self, now: float) -> None:
        rate = (self.n - self.last_n) / max(now - self.last_t, 1e-9)
        mean_rate = (self.n - self.first) / max(now - self.t0, 1e-9)
        loss = "" if self.loss is None else f", loss {self.loss:.4g}"
        eta = f", ETA {_clock((self.total - self.n) / mean_rate)}" if self.n < self.total else ", done"
        print(f"{self.desc}: step {self.n}/{self.total} ({self.n / self.total:.1%}){loss}, {rate:.3g} it/s{eta}",
              file=sys.stdout, flush=True)
        self.last_t, self.last_n = now, self.n

    def close(self) -> None:
        pass


class _Bar:
    """tqdm with the loss as its postfix."""

    def __init__(self, tqdm_bar):
        self.bar = tqdm_bar

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, loss: float | None = None) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        self.bar.close()


class _Both:
    def __init__(self, *outs):
        self.outs = outs

    def update(self, n: int = 1) -> None:
        for o in self.outs:
            o.update(n)

    def set_postfix(self, loss: float | None = None) -> None:
        for o in self.outs:
            o.set_postfix(loss)

    def close(self) -> None:
        for o in self.outs:
            o.close()


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train", every_s: float = 30.0):
    """What the trainer reports its progress with, when enabled: a tqdm bar on stderr where stderr is a
    terminal (it shows it/s itself), and plain lines on stdout (ProgressLines) where stdout is not a
    terminal or no bar is drawn — so a redirected run says what it is doing; disabled, a no-op."""
    if not enabled:
        return NullBar()
    bar = None
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm

            bar = _Bar(tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr))
        except ImportError:
            pass
    if bar is not None and sys.stdout.isatty():
        return bar
    lines = ProgressLines(total, initial, every_s, desc)
    return lines if bar is None else _Both(bar, lines)
