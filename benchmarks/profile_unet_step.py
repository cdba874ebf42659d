"""Where one UNet training step spends its time: torch.profiler self CPU (or CUDA) time grouped by op kind,
for the eager and the fused model (the configuration of bench_unet.py).

    python benchmarks/profile_unet_step.py [cpu|cuda]

It answers how much of a step the fused hot spots can win at all (Amdahl) before any speed-up is claimed.
"""
import sys

import torch

import bench_unet
from diffusion_ext import bench

GROUPS = [("convolutions", ("convolution",)), ("group norm", ("group_norm",)), ("SiLU", ("silu",)),
          ("attention", ("attention", "softmax", "bmm", "aten::matmul")),
          ("Adam", ("addcdiv", "addcmul", "sqrt", "lerp", "_foreach", "Adam")), ("dropout", ("bernoulli",))]


def group_of(name: str) -> str:
    return next((g for g, keys in GROUPS if any(k in name for k in keys)), "other")


def profile(provider: str, device: torch.device) -> dict[str, float]:
    fn = bench.synced(bench_unet.make_fn("train step", provider, device, bench_unet.batch_for(device)), device)
    fn()
    fn()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    shares: dict[str, float] = {}
    for e in prof.key_averages():
        shares[group_of(e.key)] = shares.get(group_of(e.key), 0.0) + getattr(e, attr)
    return shares


if __name__ == "__main__":
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        bench.steady_cpu_allocator()
    results = {p: profile(p, device) for p in ("eager", "fused")}
    print("| group | " + " | ".join(results) + " |\n|---|" + "---:|" * len(results))
    for g in [g for g, _ in GROUPS] + ["other"]:
        print(f"| {g} | " + " | ".join(f"{r.get(g, 0) / sum(r.values()):.1%}" for r in results.values()) + " |")
    print("| total (ms) | " + " | ".join(f"{sum(r.values()) / 1e3:.0f}" for r in results.values()) + " |")
