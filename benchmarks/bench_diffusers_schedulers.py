"""diffusers' scheduler steps patched onto diffusion_ext (integrations.diffusers.patch) vs diffusers' own, in one
run: a chain of `step` calls (DDPMScheduler, DDIMScheduler η = 0, DPMSolverMultistepScheduler 2M and its SDE
variant, each set to --steps inference steps), with one fixed model output, so only the scheduler is timed.

    python benchmarks/bench_diffusers_schedulers.py cpu|cuda [--steps N] [--reps N] [--quick]

prints a markdown table: the milliseconds per step of each side (minimum and median of interleaved repetitions of
the whole chain, timing.interleaved) and the ratio diffusers / patched. CPU: fp32, (16, 3, 64, 64) — a pixel
pipeline's batch of 64×64 images — and (1, 4, 64, 64), one latent of a 512×512 image; CUDA: bf16 model
output with an fp32 sample (what an autocast pipeline passes), (64, 3, 64, 64) and (16, 4, 64, 64). Needs
diffusers (pip install 'diffusion_ext[diffusers]'). No assertion here is about time.
"""
from __future__ import annotations

import argparse
import sys

import torch

from diffusion_ext import timing

SCHEDULERS = ("DDPM", "DDIM", "DPM-Solver++ 2M", "SDE-DPM-Solver++ 2M")


def make(name: str):
    import diffusers

    if name == "DDPM":
        return diffusers.DDPMScheduler()
    if name == "DDIM":
        return diffusers.DDIMScheduler()
    return diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++" if name.startswith("SDE")
                                                 else "dpmsolver++")


def chain(sched, model_output: torch.Tensor, sample: torch.Tensor, steps: int):
    """One sampling chain of `steps` steps from `sample`, with the same model output at every step."""
    def run():
        sched.set_timesteps(steps, device=sample.device)
        g = torch.Generator(sample.device).manual_seed(0)
        x = sample
        for t in sched.timesteps:
            x = sched.step(model_output, t, x, generator=g).prev_sample
        return x
    return run


def table(device: torch.device, steps: int, reps: int, quick: bool = False) -> str:
    from diffusion_ext.integrations import diffusers as dxd

    cuda = device.type == "cuda"
    shapes = [(64, 3, 64, 64), (16, 4, 64, 64)] if cuda else [(16, 3, 64, 64), (1, 4, 64, 64)]
    if quick:
        shapes, steps, reps = [(2, 3, 8, 8)], 3, 1
    out_dtype = torch.bfloat16 if cuda else torch.float32
    lines = ["| scheduler | shape | diffusers (ms/step, min / median) | patched (ms/step, min / median) | "
             "diffusers / patched (min) |", "|---|---|---:|---:|---:|"]
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(shape, generator=g).to(device)
        model_output = (0.5 * torch.randn(shape, generator=g)).to(device, out_dtype)
        for name in SCHEDULERS:
            plain, fused = make(name), make(name)
            dxd.patch(fused)
            t = timing.interleaved({"diffusers": chain(plain, model_output, sample, steps),
                                    "patched": chain(fused, model_output, sample, steps)}, reps)
            cells = []
            for side in ("diffusers", "patched"):
                ms = sorted(t.times[side])
                cells.append(f"{1e3 * ms[0] / steps:.3f} / {1e3 * ms[len(ms) // 2] / steps:.3f}")
            ratio = t.min("diffusers") / t.min("patched")
            lines.append(f"| {name} | {tuple(shape)} | {cells[0]} | {cells[1]} | {ratio:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_diffusers_schedulers.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("device", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=20, help="inference steps per chain (default 20)")
    p.add_argument("--reps", type=int, default=7, help="timed chains per side, interleaved (default 7)")
    p.add_argument("--quick", action="store_true", help="a smoke test: one tiny shape, 3 steps, one repetition")
    args = p.parse_args(argv)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed: pip install 'diffusion_ext[diffusers]'")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(table(device, args.steps, args.reps, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
