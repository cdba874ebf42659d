"""The demo's speed table: each fused op against what a user would run instead, at the demo's shapes, then
the whole training and sampling steps, and how much of a training step the convolutions take (from a
profile taken in the same run), which bounds what fused norms and attention can change on this device.

Every row is timed here and now (timing.interleaved: the two sides alternate, minimum of the repetitions).
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.nn.functional as F

from . import ops, reference, timing


def _pair(fused, eager, reps: int) -> tuple[float, float]:
    t = timing.interleaved({"eager": eager, "fused": fused}, reps)
    return t.min("eager"), t.min("fused")


def op_rows(device, batch: int, size: int, channels: int, reps: int = 15,
            precision: str = "fp32") -> list[tuple[str, str, float, float]]:
    """(what, against, eager s, fused s) for the noise op, the sampler step, GN+SiLU, dropout and attention at
    the demo model's shapes: images (batch, 3, size, size), its widest maps (batch, channels, size/2, size/2)
    and attention over such a map, (size/2)² tokens of `channels` in heads of 32. precision "bf16" times the
    activation rows (norm, dropout, attention) as the model runs them under bf16 autocast: bf16 activations,
    fp32 γ and β, both sides under autocast; the noise and the sampler step work on fp32 images either way."""
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    ac = torch.linspace(0.9999, 0.001, 1000, dtype=torch.float64).to(device)
    eps = torch.randn(batch, 3, size, size, generator=g).to(device)
    rows = []
    e, f = _pair(lambda: ops.q_sample_with_noise(x0, t, ac, seed=1),
                 lambda: reference.q_sample(x0, t, torch.randn_like(x0), ac), reps)
    rows.append(("noise + q_sample (training input)", "randn_like + eager q_sample", e, f))
    tp = (t - 20).clamp(min=-1)
    e, f = _pair(lambda: ops.ddim_step(eps, t, tp, x0, ac), lambda: reference.ddim_step(eps, t, tp, x0, ac), reps)
    rows.append(("DDIM update (sampler step)", "diffusers-style eager", e, f))
    low = precision == "bf16"
    act = torch.bfloat16 if low else torch.float32
    suffix = ", bf16" if low else ""

    def autocast(fn):
        def run():
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=low):
                return fn()
        return run

    h = torch.randn(batch, channels, size // 2, size // 2, generator=g).to(device, act)
    w, b = torch.ones(channels, device=device), torch.zeros(channels, device=device)
    e, f = _pair(autocast(lambda: ops.group_norm_act(h, 8, w, b)),
                 autocast(lambda: F.silu(F.group_norm(h, 8, w, b))), reps)
    rows.append((f"GroupNorm + SiLU {tuple(h.shape)}{suffix}", "F.group_norm + F.silu", e, f))
    # dropout as a training step runs it (forward and backward); the demo's own model trains without
    hd, gh = h.clone().requires_grad_(), torch.randn(h.shape, generator=g).to(device, act)
    e, f = _pair(autocast(lambda: ops.dropout(hd, 0.1, 1).backward(gh)),
                 autocast(lambda: F.dropout(hd, 0.1, training=True).backward(gh)), reps)
    rows.append((f"dropout 0.1, forward + backward {tuple(h.shape)}{suffix}", "F.dropout (torch's Bernoulli mask)", e, f))
    L, heads = (size // 2) ** 2, max(1, channels // 32)
    q, k, v = (torch.randn(batch, heads, L, 32, generator=g).to(device, act) for _ in range(3))
    e, f = _pair(autocast(lambda: ops.attention(q, k, v)), autocast(lambda: reference.attention(q, k, v)), reps)
    rows.append((f"attention {tuple(q.shape)}{suffix}", "naive softmax(q·kᵀ)·v", e, f))
    e, f = _pair(autocast(lambda: ops.attention(q, k, v)),
                 autocast(lambda: F.scaled_dot_product_attention(q, k, v)), reps)
    rows.append((f"attention {tuple(q.shape)}{suffix}", "F.scaled_dot_product_attention", e, f))
    return rows


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs its start and stop to file descriptor 2: keep that out of the table."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def conv_share(train_step) -> float:
    """The share of one training step's operator time (torch.profiler, self time) spent in convolutions."""
    train_step()
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_step()
    times = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(times.values())
    conv = sum(v for k, v in times.items() if "conv" in k)
    return conv / total if total else 0.0


def markdown(rows, steps: dict, share: float) -> str:
    """rows of op_rows; steps: {"training step": Timing, "sampling step": Timing} (sides eager, fused)."""
    out = ["| what | fused vs | eager (ms) | fused (ms) | speed-up |", "|---|---|---:|---:|---:|"]
    for what, vs, e, f in rows:
        out.append(f"| {what} | {vs} | {e * 1e3:.3f} | {f * 1e3:.3f} | {e / f:.2f}× |")
    for name, t in steps.items():
        e, f = t.min("eager"), t.min("fused")
        out.append(f"| whole {name} | the eager model | {e * 1e3:.1f} | {f * 1e3:.1f} | {e / f:.2f}× |")
    out.append("")
    out.append(f"Why the whole step moves less than the fused ops: convolutions took {share:.0%} of the fused "
               f"model's training step in a profile taken just now, and the kernels here do not touch them.")
    return "\n".join(out)
