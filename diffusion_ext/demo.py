"""`python -m diffusion_ext demo`: a tiny pixel DDPM on builtin:shapes, trained and sampled on a laptop CPU.

It shows three things in a few minutes: the model learns (the shapes checker accepts a clear fraction of
its DDIM samples, against ~0 for pure noise), the artefacts of a run (checkpoint, JSONL log, sample grid,
loss curve), and the speed of the fused model against the eager one (same config and weights; one
training step = forward + backward + Adam step, one sampling step = one model call + one DDIM update;
the minimum of interleaved repetitions, measured in the same run, with how busy the machine was).
"""
from __future__ import annotations

import os
import sys
import time

import torch

from .cpu_features import native_bf16

# The demo's budget (cli.py's `demo --help` quotes it; python_tests/test_docs.py checks that it does).
DEMO_STEPS = {16: 600, 32: 600}
DEMO_BATCH = 32
DEMO_SAMPLE_STEPS = 50
SAMPLING_LAYOUT = "auto"  # the sampling step's layout: load_trained's default (train.sampling_memory_format)


def demo_config(out: str, image_size: int, steps: int, seed: int, num_samples: int, fused: bool, quiet: bool,
                device: str | None, precision: str = "fp32"):
    from .train import TrainConfig

    return TrainConfig(
        task="pixel", data="builtin:shapes", out=out, image_size=image_size, data_size=4096,
        base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=(), dropout=0.0,
        head_dim=32, num_groups=8, fused=fused,
        # the cosine schedule and v-prediction learn the global layout (one background, one shape) far
        # faster than linear + ε here: 23 % valid samples after 700 steps against 6 % (ε, cosine) and 0 % (ε, linear);
        # Min-SNR-γ weighting (Hang et al. 2023) with γ = 2 moves the gradient from the nearly clean timesteps
        # (texture) to the middle ones, where the layout is decided, and a cosine decay of the learning rate
        # ends the short run on settled weights (benchmarks/results/demo-recipe-cpu-2026-12-01.md: what each
        # bought, over several training seeds; γ = 5, the paper's, did less here, and γ = 1 no better than 2)
        num_timesteps=1000, beta_schedule="cosine", prediction_type="v_prediction", snr_gamma=2.0,
        steps=steps, batch_size=DEMO_BATCH, lr=2e-3, lr_warmup=50, lr_decay="cosine", clip_grad=1.0,
        ema_decay=0.995,
        seed=seed, device=device, ckpt_every=max(1, steps // 2), log_every=1, sample_every=0,
        # deterministic DDIM from t = T − 1 ("trailing", Lin et al. 2024): the leading spacing starts at t = 980,
        # whose x_t still holds signal that pure noise lacks; 50 steps cost ~5 s here
        num_samples=num_samples, sample_steps=DEMO_SAMPLE_STEPS, sample_spacing="trailing", quiet=quiet,
        precision=precision)


def demo_precision(device: torch.device) -> tuple[str, str]:
    """(precision, why): the fastest the device supports — bf16 autocast on a GPU with bf16 or a CPU with
    native bf16, else fp32."""
    if device.type == "cuda":
        return ("bf16", "the GPU has bf16") if torch.cuda.is_bf16_supported() else ("fp32", "the GPU has no bf16")
    if native_bf16():
        return "bf16", "the CPU has native bf16 (AVX512-BF16/AMX)"
    return "fp32", "the CPU has no native bf16, which torch would emulate far slower than fp32"


def fused_available(device: torch.device) -> tuple[bool, str]:
    """Whether every fused kernel the UNet uses runs on `device` (a kernel may not be built here)."""
    from . import ops

    try:
        x = torch.randn(2, 8, 4, 4, device=device)
        ops.group_norm_act(x, 4, None, None, 1e-5, "silu")
        q = torch.randn(1, 2, 16, 32, device=device)
        ops.attention(q, q, q)
    except (NotImplementedError, RuntimeError) as e:
        return False, str(e).splitlines()[0][:160]
    return True, ""


def step_fns(model_config: dict, state_dict: dict, diffusion, device, batch: int, fused: bool,
             precision: str = "fp32"):
    """(one training step, one DDIM sampling step) of the model built with `fused`, as callables over
    fixed inputs: forward + backward + Adam step; one model call + one DDIM update; under bf16 autocast
    when precision is "bf16", as the demo trained. The sampling step runs a copy of the model in the
    layout `sample` loads it in (SAMPLING_LAYOUT: channels_last on a CPU), from a contiguous x_t as the
    sampler's; the training step the model as the trainer has it (NCHW)."""
    from .models import build_model
    from .train import sampling_memory_format

    torch.manual_seed(0)
    model = build_model("unet", model_config, fused=fused).to(device)
    model.load_state_dict(state_dict)
    sampling_model = build_model("unet", model_config, fused=fused).to(device)
    sampling_model.load_state_dict(state_dict)
    sampling_model = sampling_model.to(memory_format=sampling_memory_format(SAMPLING_LAYOUT, device)).eval()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    S, C = model_config["image_size"], model_config["in_channels"]
    x0 = torch.rand(batch, C, S, S, device=device) * 2 - 1
    t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
    x = torch.randn(batch, C, S, S, device=device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        x_t, eps = diffusion.schedule.q_sample_with_noise(x0, t, seed=1)
        with autocast():
            loss = torch.nn.functional.mse_loss(model(x_t, t).float(), eps)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def sample_step():
        with autocast():
            diffusion.sample_step(sampling_model, x, 500, 480, sampler="ddim")

    return train_step, sample_step


def time_steps(model_config: dict, state_dict: dict, diffusion, device, batch: int, fused_too: bool,
               reps: int = 9, precision: str = "fp32") -> dict:
    """The training and the sampling step of the eager model and (fused_too) the fused one, timed
    interleaved (timing.interleaved): {"train": Timing, "sample": Timing}, sides "eager" and "fused"."""
    from . import timing

    sides = {"eager": step_fns(model_config, state_dict, diffusion, device, batch, False, precision)}
    if fused_too:
        sides["fused"] = step_fns(model_config, state_dict, diffusion, device, batch, True, precision)
    return {"train": timing.interleaved({k: v[0] for k, v in sides.items()}, reps),
            "sample": timing.interleaved({k: v[1] for k, v in sides.items()}, reps * 2)}


def default_threads() -> int:
    """Every CPU this process may use when the others are idle as the demo starts (other processes keep
    less than a quarter of a core busy over half a second), else one fewer (at least 1). torch's OpenMP
    threads wait for one another at every op, so one that shares a core with another process slows them
    all: on the 2-core machine here with the other core busy, 2 threads ran the demo's training step slower
    than 1 thread (benchmarks/demo_threads.py), while on the idle machine 2 threads ran it 1.6× faster
    (fused: 152 against 243 ms)."""
    from . import timing

    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    meter = timing.LoadMeter()
    time.sleep(0.5)
    others = meter.stop().others_cores
    idle = others is not None and others < 0.25
    return max(1, min(torch.get_num_threads(), cpus if idle else cpus - 1))


def main(args) -> int:
    from . import timing
    from .data.shapes import valid_fraction
    from .run_folder import prepare_new_run
    from .train import build_diffusion, load_trained, sampling_memory_format, train

    try:
        moved = prepare_new_run(args.out, getattr(args, "overwrite", False), command="demo")
    except ValueError as e:
        print(f"diffusion_ext {e}", file=sys.stderr)
        return 2
    if moved:
        print(f"moved the earlier run in {args.out} to {moved}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads or default_threads())
    S = args.image_size
    steps = args.steps or DEMO_STEPS[S]
    ok, why = fused_available(device)
    if not ok:
        print(f"note: a fused kernel is not available on {device.type} here ({why}); the demo trains the eager "
              "model and cannot time the fused one", file=sys.stderr)
    precision, why_precision = demo_precision(device)
    cfg = demo_config(args.out, S, steps, args.seed, args.num_samples, ok, args.quiet, str(device), precision)
    print(f"demo: training a pixel DDPM on builtin:shapes {S}×{S} for {steps} steps (batch {DEMO_BATCH}, "
          f"{'fused' if ok else 'eager'} model, {device}, {precision}: {why_precision}; torch threads: "
          f"{torch.get_num_threads()}) ...", flush=True)
    meter = timing.LoadMeter()
    summary = train(cfg, log=lambda *a: None)
    load = meter.stop()
    if summary.get("interrupted"):
        print(f"interrupted after step {summary['step']}; the checkpoint is {summary['checkpoint']}")
        return summary["exit_code"]
    g = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(args.num_samples, 3, S, S, generator=g).clamp(-1, 1)
    noise_frac = valid_fraction(noise)
    print(f"trained in {load.wall_s:.0f} s ({load.describe()}); loss {_first_last(os.path.join(args.out, 'log.jsonl'))}")
    print(f"samples (DDIM, {cfg.sample_steps} steps from t = T - 1, EMA weights): {summary['samples']}")
    print(f"shapes checker accepts {summary['valid_fraction']:.1%} of {args.num_samples} samples "
          f"vs {noise_frac:.1%} of pure noise")
    print(f"loss curve: {summary['loss_curve']}; checkpoint: {summary['checkpoint']}")

    # fused vs eager: the same config and weights, measured here and now, interleaved
    m = load_trained(summary["checkpoint"], device, fused=False)
    diffusion = build_diffusion(cfg.to_dict(), device)
    t = time_steps(m.model.config, m.model.state_dict(), diffusion, device, DEMO_BATCH, fused_too=ok,
                   precision=precision)
    print(f"\nspeed on {device} (batch {DEMO_BATCH}, {S}×{S}, {precision}; torch threads {torch.get_num_threads()}; "
          "each row the minimum of interleaved repetitions taken just now):")
    if ok:
        from . import demo_speed

        train_step = step_fns(m.model.config, m.model.state_dict(), diffusion, device, DEMO_BATCH, True, precision)[0]
        rows = demo_speed.op_rows(device, DEMO_BATCH, S, 2 * cfg.base_channels, precision=precision)
        layout = "channels_last" if sampling_memory_format(SAMPLING_LAYOUT, device) == torch.channels_last else "NCHW"
        print(demo_speed.markdown(rows, {"training step": t["train"], f"sampling step ({layout}, as `sample` loads "
                                                                       f"the model)": t["sample"]},
                                  demo_speed.conv_share(train_step)))
    else:
        for name in t["train"].times:
            print(f"{name}: training step {t['train'].min(name) * 1e3:.1f} ms, sampling step "
                  f"{t['sample'].min(name) * 1e3:.1f} ms")
    print(f"training step: {t['train'].describe()}")
    print(f"sampling step: {t['sample'].describe()}")
    print(f"\nnext: sample more from this model with `python -m diffusion_ext sample --checkpoint "
          f"{summary['checkpoint']} --num 64 --sampler dpmpp_2m --steps 20 --out grid.png`; train on your own images "
          f"with `python -m diffusion_ext train --task pixel --data PATH/TO/IMAGES --out runs/mine`; on a GPU "
          "machine, `bash benchmarks/gpu_check.sh call1 OUT` and `call2 OUT` test and time every kernel (README: "
          "What has run on a GPU).")
    return 0


def _first_last(log_path: str) -> str:
    from .train import summarize_loss

    first, last = summarize_loss(log_path)
    return f"{first:.3f} (first 10 % of steps) -> {last:.3f} (last 10 %)"
