"""Interleaved min-of-N timing of a few callables, with a report of how busy the machine was meanwhile.

Why this shape: on a small shared machine another process can take a core for seconds at a time, and
torch's OpenMP threads then wait for it. Timing side A to the end and then side B puts A and B under
different loads, and the ratio can change direction between two runs. Interleaved (A, B, B, A, A, B, ...)
both sides see the same disturbances; the minimum over the repetitions is the time of an undisturbed
call (noise only ever adds time), so the ratio of minima is the steady one. Whether the machine was
disturbed is reported beside the numbers, from the CPU time other processes used during the
measurement (Linux /proc/stat), the load average, and the spread of the repetitions.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

# The repetitions of a side spread more than this (median / min − 1) on a disturbed machine.
NOISY_SPREAD = 0.25
# Other processes kept more than this many cores busy on average: the machine was busy.
BUSY_CORES = 0.5


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none): CPU timings taken while other work
    runs, with torch's threads waiting for a busy core, are not to be trusted."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


@dataclass
class MachineLoad:
    """What else ran on the machine during a measurement."""
    cpus: int
    wall_s: float
    others_cores: float | None       # cores kept busy by other processes on average (None: unknown)
    load_before: float | None        # 1-minute load averages (include this process)
    load_after: float | None

    @property
    def busy(self) -> bool:
        if self.others_cores is not None:
            return self.others_cores > BUSY_CORES
        return self.load_before is not None and self.load_before > 0.5 * self.cpus

    def describe(self) -> str:
        parts = []
        if self.others_cores is not None:
            parts.append(f"other processes kept {self.others_cores:.2f} of {self.cpus} cores busy")
        if self.load_before is not None and self.load_after is not None:
            parts.append(f"1-minute load average {self.load_before:.2f} before, {self.load_after:.2f} after")
        return "; ".join(parts) or "machine load unknown"


class LoadMeter:
    """Start before a measurement, stop after: the CPU time of other processes in between."""

    def __init__(self):
        self.cpus = os.cpu_count() or 1
        self.load_before = load_average()
        self._jiffies = _cpu_jiffies()
        self._own = _own_cpu_s()
        self._t0 = time.perf_counter()

    def stop(self) -> MachineLoad:
        wall = time.perf_counter() - self._t0
        others = None
        end = _cpu_jiffies()
        if self._jiffies is not None and end is not None and end[1] > self._jiffies[1]:
            busy_frac = (end[0] - self._jiffies[0]) / (end[1] - self._jiffies[1])  # of all CPUs
            own_cores = (_own_cpu_s() - self._own) / max(wall, 1e-9)
            others = max(0.0, busy_frac * self.cpus - own_cores)
        return MachineLoad(self.cpus, wall, others, self.load_before, load_average())


@dataclass
class Timing:
    """Seconds per call of each side: every repetition, and the minimum (the undisturbed time)."""
    times: dict[str, list[float]]
    load: MachineLoad

    def min(self, name: str) -> float:
        return min(self.times[name])

    def spread(self, name: str) -> float:
        """median / min − 1: 0 on a quiet machine, large when some repetitions were disturbed."""
        t = sorted(self.times[name])
        return t[len(t) // 2] / t[0] - 1.0

    @property
    def noisy(self) -> bool:
        return self.load.busy or any(self.spread(n) > NOISY_SPREAD for n in self.times)

    def describe(self) -> str:
        """One line: how many repetitions, how busy the machine was, and whether to trust the numbers."""
        reps = min(len(v) for v in self.times.values())
        spreads = ", ".join(f"{n} {self.spread(n):.0%}" for n in self.times)
        verdict = ("the machine was busy: the minima are the best estimate, but run again on an idle machine "
                   "before quoting them") if self.noisy else "the machine was quiet"
        return f"min of {reps} interleaved repetitions; {self.load.describe()}; spread (median/min − 1) " \
               f"{spreads}: {verdict}"


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> Timing:
    """Times each callable `reps` times, interleaved, the order reversed every round (A B, B A, A B, ...)
    so that neither side always runs first after the other; CUDA is synchronised after every call."""
    if reps < 1:
        raise ValueError(f"timing.interleaved: reps must be at least 1, got {reps}")
    names = list(fns)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    meter = LoadMeter()
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
    return Timing(times, meter.stop())
