"""PatchReport: what `diffusers.patch` fused, what it left to diffusers' code and why.

One entry per module (or scheduler method) that patch looked at, so the report answers both "how many"
(per kind) and "which ones" (the module paths), and merges across the components of a pipeline.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    path: str      # "down_blocks.0.resnets.1", "scheduler.step"; "" for the object itself
    kind: str      # what was (or was not) fused, e.g. "ResnetBlock2D norm→act as group_norm_act"
    where: str     # the enclosing block's class, e.g. "AttnDownBlock2D" ("" when none)
    reason: str = ""  # for what runs diffusers' code: why


@dataclass
class PatchReport:
    """`fused` and `kept` list the entries; `counts()` and `kept_counts()` count them per kind (and reason).
    `notes` are conditions checked at call time (attention masks, dtypes, devices, ...): a call that meets
    one runs diffusers' code for that call only. str(report) is a table for people."""

    target: str
    diffusers_version: str
    fused: list[Entry] = field(default_factory=list)
    kept: list[Entry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_fused(self, path: str, kind: str, where: str = "") -> None:
        self.fused.append(Entry(path, kind, where))

    def add_kept(self, path: str, kind: str, reason: str, where: str = "") -> None:
        self.kept.append(Entry(path, kind, where, reason))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def merge(self, other: "PatchReport", prefix: str) -> None:
        """Adds a component's report (e.g. a pipeline's unet) under `prefix`."""
        def moved(e: Entry) -> Entry:
            return Entry(f"{prefix}.{e.path}" if e.path else prefix, e.kind, e.where, e.reason)

        self.fused += [moved(e) for e in other.fused]
        self.kept += [moved(e) for e in other.kept]
        for n in other.notes:
            self.note(n)

    def counts(self) -> dict[str, int]:
        """kind -> how many were fused."""
        return dict(Counter(e.kind for e in self.fused))

    def kept_counts(self) -> dict[tuple[str, str], int]:
        """(kind, reason) -> how many run diffusers' code."""
        return dict(Counter((e.kind, e.reason) for e in self.kept))

    def __str__(self) -> str:
        lines = [f"diffusion_ext.integrations.diffusers.patch({self.target}) with diffusers {self.diffusers_version}"]
        lines.append("fused:" if self.fused else "fused: nothing")
        for kind, n in self.counts().items():
            where = Counter(e.where for e in self.fused if e.kind == kind and e.where)
            inside = f"  (in {', '.join(f'{w} ×{c}' for w, c in where.items())})" if where else ""
            lines.append(f"  {n:4d} × {kind}{inside}")
        if self.kept:
            lines.append("runs diffusers' code:")
            for (kind, reason), n in self.kept_counts().items():
                lines.append(f"  {n:4d} × {kind}: {reason}")
        if self.notes:
            lines.append("at call time, diffusers' code runs for:")
            lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__
