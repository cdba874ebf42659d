"""diffusers' UNet2DModel patched onto diffusion_ext (integrations.diffusers.patch) vs unpatched vs
torch.compile of the unpatched model, measured in one run:

- "train step": forward, backward and Adam step of the ε-prediction loss at 64×64 (add_noise through the
  scheduler, patched with the model);
- "DDIM pipeline": a 50-step DDIMPipeline call (eta 0, output_type "pt").

The model is the report's 64×64 U-Net as a UNet2DModel (diffusers_backbone.REPORT_64: attention at 16×16
and in the mid-block). CPU: batch 8, fp32 and bf16 autocast. CUDA: batch 64, bf16 autocast.

    python benchmarks/bench_diffusers.py cpu|cuda [--quick] [--no-compile] [--batch N] [--steps N]
                                         [--precisions fp32,bf16] [--reps N] [--modes train,pipeline]
                                         [--channels-last] [--compile-patched]

prints a markdown table (median and minimum of interleaved repetitions) with the ratio to the unpatched
model measured in the same run; a case that fails
gets a row saying why and the table goes on. --quick (a smoke test, not a measurement): batch 1 (8 on
CUDA), a 2-step pipeline, one timed repetition. --batch, --steps, --precisions override the defaults (a
CPU without native bf16 — AVX512-BF16, AMX — emulates bf16 convolutions, ~60× slower than fp32 on the
2-core AVX2 machine here: the bf16 rows want a smaller batch there). --channels-last puts every provider's
model and inputs in channels_last (the layout a CPU user picks for oneDNN's convolutions; the pipeline's
x_T stays contiguous and its first convolution's output follows the weights). Needs diffusers
(pip install 'diffusion_ext[diffusers]'); without it the table says so. No assertion here is about time.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from diffusion_ext import bench

MODES = ("train step", "DDIM pipeline")
PROVIDERS = ("unpatched", "patched", "compile(unpatched)", "compile(patched)")
DEFAULT_PROVIDERS = PROVIDERS[:3]  # compile(patched) on request (--compile-patched): one more compilation


def settings(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        return dict(batch=8 if quick else 64, steps=2 if quick else 50, precisions=("bf16",))
    return dict(batch=1 if quick else 8, steps=2 if quick else 50, precisions=("fp32", "bf16"))


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def make_fn(mode: str, provider: str, precision: str, device: torch.device, batch: int, steps: int,
            channels_last: bool = False):
    """A no-argument callable running one case (built fresh: each provider has its own model)."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel

    from diffusion_ext.integrations import diffusers as dxd
    from diffusion_ext.integrations.diffusers_backbone import REPORT_64

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unet = UNet2DModel(**REPORT_64).to(device, memory_format=fmt)
    scheduler = DDPMScheduler(num_train_timesteps=1000) if mode == "train step" else DDIMScheduler(1000)
    if provider in ("patched", "compile(patched)"):
        dxd.patch(unet)
        dxd.patch(scheduler)
    net = torch.compile(unet) if provider.startswith("compile") else unet
    autocast = _autocast(device, precision)
    g = torch.Generator().manual_seed(1)
    if mode == "train step":
        x0 = (torch.rand(batch, 3, 64, 64, generator=g) * 2 - 1).to(device, memory_format=fmt)
        noise = torch.randn(batch, 3, 64, 64, generator=g).to(device, memory_format=fmt)
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
        unet.train()

        def fn():
            opt.zero_grad(set_to_none=True)
            x_t = scheduler.add_noise(x0, noise, t)
            with autocast:
                loss = torch.nn.functional.mse_loss(net(x_t, t).sample.float(), noise)
            loss.backward()
            opt.step()
            return loss
        return fn

    unet.eval()
    pipe = DDIMPipeline(unet=net, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def fn():
        with autocast:
            return pipe(batch_size=batch, generator=torch.Generator(device).manual_seed(0), num_inference_steps=steps,
                        output_type="pt").images
    return fn


def _why(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"failed: {type(e).__name__}: {msg[:160]}".replace("|", "/")


def table(device, quick: bool = False, compile_models: bool = True, **overrides) -> str:
    """The markdown table; overrides: batch, steps, precisions, reps, modes, channels_last, providers (None:
    the defaults of settings(), DEFAULT_PROVIDERS)."""
    device = torch.device(device)
    s = settings(device, quick)
    s.update({k: v for k, v in overrides.items() if v is not None})
    head = ["| mode | precision | provider | median (ms) | min (ms) | vs unpatched (median) |",
            "|---|---|---|---:|---:|---:|"]
    try:
        import diffusers
    except ImportError as e:
        return "\n".join(head + [f"| all | all | all | not measured: diffusers is not installed ({e}); "
                                 f"pip install 'diffusion_ext[diffusers]' | — | — |"])
    if device.type == "cpu":
        bench.steady_cpu_allocator()
    from diffusion_ext import timing

    reps = 1 if quick else s.get("reps") or 5
    lines = list(head)
    modes = [m for m in MODES if m in (s.get("modes") or MODES)]
    for mode in modes:
        for precision in s["precisions"]:
            fns, rows = {}, {}
            providers = [p for p in PROVIDERS if p in (s.get("providers") or DEFAULT_PROVIDERS)]
            for provider in providers:
                if provider.startswith("compile") and not compile_models:
                    rows[provider] = f"| {mode} | {precision} | {provider} | skipped (--no-compile) | — | — |"
                    continue
                try:  # built and called once (compiles): a provider that fails is a row saying why
                    fns[provider] = bench.synced(make_fn(mode, provider, precision, device, s["batch"], s["steps"],
                                                         bool(s.get("channels_last"))), device)
                    fns[provider]()
                except Exception as e:  # noqa: BLE001 - the row says why; the table goes on
                    fns.pop(provider, None)
                    rows[provider] = f"| {mode} | {precision} | {provider} | {_why(e)} | — | — |"
            # the providers alternate (A B, B A, ...): the same disturbances for all, the ratio from one run
            t = timing.interleaved(fns, reps, warmup=0 if quick else 1)
            med = {p: sorted(v)[len(v) // 2] for p, v in t.times.items()}
            for provider in providers:
                if provider in med:
                    ratio = f"{med['unpatched'] / med[provider]:.2f}×" if "unpatched" in med else "— (no unpatched time)"
                    rows[provider] = (f"| {mode} | {precision} | {provider} | {med[provider] * 1e3:.1f} | "
                                      f"{t.min(provider) * 1e3:.1f} | {ratio} |")
                lines.append(rows[provider])
                print(lines[-1], file=sys.stderr)
            if fns:
                lines.append(f"<!-- {mode}, {precision}: {t.describe()} -->")
    note = " — quick run: a smoke test, not a measurement" if quick else ""
    layout = "channels_last" if s.get("channels_last") else "contiguous"
    return (f"diffusers {diffusers.__version__} UNet2DModel (diffusers_backbone.REPORT_64), 64×64, {layout}, "
            f"batch {s['batch']}, " + (f"DDIM pipeline {s['steps']} steps, " if "DDIM pipeline" in modes else "") +
            f"{device.type}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{note}\n\n" + "\n".join(lines))


def _parser():
    import argparse

    def positive(v: str) -> int:
        if not v.isdigit() or int(v) < 1:
            raise argparse.ArgumentTypeError(f"expected a positive int, got {v!r}")
        return int(v)

    def precisions(v: str) -> tuple[str, ...]:
        out = tuple(p.strip() for p in v.split(",") if p.strip())
        if not out or any(p not in ("fp32", "bf16") for p in out):
            raise argparse.ArgumentTypeError(f"expected fp32 and/or bf16, comma-separated, got {v!r}")
        return out

    def modes(v: str) -> tuple[str, ...]:
        names = {"train": "train step", "pipeline": "DDIM pipeline"}
        out = tuple(names.get(m.strip(), "?") for m in v.split(",") if m.strip())
        if not out or "?" in out:
            raise argparse.ArgumentTypeError(f"expected train and/or pipeline, comma-separated, got {v!r}")
        return out

    p = argparse.ArgumentParser(prog="python benchmarks/bench_diffusers.py",
                                description="patched vs unpatched vs torch.compile'd diffusers UNet2DModel")
    p.add_argument("device", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="a smoke test: batch 1 (8 on CUDA), 2 steps, one repetition")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    p.add_argument("--batch", type=positive, help="batch size (default: 8 on CPU, 64 on CUDA)")
    p.add_argument("--steps", type=positive, help="DDIM pipeline steps (default 50)")
    p.add_argument("--precisions", type=precisions, help="fp32,bf16 on CPU (default both); CUDA runs bf16")
    p.add_argument("--reps", type=positive, help="timed repetitions of each provider, interleaved (default 5)")
    p.add_argument("--modes", type=modes, help="train,pipeline (default both)")
    p.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    p.add_argument("--compile-patched", action="store_true", help="add a row for torch.compile of the patched model")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_diffusers.py: cuda requested, but torch sees no CUDA device", file=sys.stderr)
        return 2
    print(table(args.device, args.quick, args.compile, batch=args.batch, steps=args.steps,
                precisions=args.precisions, reps=args.reps, modes=args.modes,
                channels_last=args.channels_last or None,
                providers=PROVIDERS if args.compile_patched else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
