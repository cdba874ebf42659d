"""`python -m diffusion_ext <command>`: the command line of diffusion_ext.

Commands are argparse subcommands, each registered by a small `_add_<name>` function that sets its
handler with set_defaults(func=...): bench, train, sample, demo, predict-depth, eval-depth, export.
Handlers import what they need lazily: `--help` and one command never pay for another's imports.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

from .out_paths import check_out_dir, check_out_file


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _samplers() -> tuple[str, ...]:
    from .sampling import SAMPLERS

    return tuple(SAMPLERS)


def _spacings() -> tuple[str, ...]:
    from .schedule import SPACINGS

    return SPACINGS


SAMPLER_HELP = "ddpm, ddim (default), dpmpp_2m (DPM-Solver++(2M), for few steps) or dpmpp_2m_sde (its SDE variant)"
SPACING_HELP = ("timesteps of a respaced chain: leading (the default of ddpm and ddim, as diffusers), trailing (starts at "
                "t = T - 1: better samples in few steps, Lin et al. 2024), linspace (DPM-Solver++'s default), karras; "
                "default the sampler's own")


# ----------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------
def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time the schedule ops against eager PyTorch",
        description="Times q_sample, q_sample_with_noise, ddpm_step (with and without guidance), ddim_step, "
                    "dpmpp_2m_step and dropout "
                    "for every provider (eager, compile, and each diffusion_ext backend for the device) and "
                    "prints time, effective GB/s and the ratio to eager measured in the same run.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device to measure on (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="few repetitions: a smoke test, not a measurement")
    p.add_argument("--markdown", metavar="OUT.md", help="also write the table, with the environment, to this file")
    p.add_argument("--ops", type=_csv, default=None, metavar="OP[,OP...]",
                   help="only these ops (q_sample, q_sample_with_noise, ddpm_step, ddpm_step_cfg, ddim_step, "
                        "dpmpp_2m_step, dropout)")
    p.add_argument("--providers", type=_csv, default=None, metavar="P[,P...]",
                   help="only these providers (eager is always measured: the ratios need it)")
    p.add_argument("--dtypes", type=_csv, default=None, metavar="DTYPE[,DTYPE...]",
                   help="e.g. float32,bfloat16 (default: float32 on CPU; float32, float16, bfloat16 on GPU)")
    p.add_argument("--shapes", type=_csv, default=None, metavar="SHAPE[,SHAPE...]",
                   help="e.g. 256x4x128x128 (default: the device's shapes in diffusion_ext.bench)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch.set_num_threads(N) before measuring (CPU kernels and eager alike)")
    p.add_argument("--default-malloc", action="store_true",
                   help="on CPU, leave glibc's malloc thresholds as they are (by default they are fixed, so that "
                        "eager's temporaries do not page-fault on every call depending on what ran before)")
    p.add_argument("--compile", action="store_true",
                   help="on CPU, also measure torch.compile of the eager code (inductor's CPU compile is slow)")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    import torch

    from . import bench

    if args.markdown:
        bad = _check_out("bench", lambda: check_out_file(args.markdown, "--markdown", what="markdown file"))
        if bad:
            return bad
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("diffusion_ext bench: --device cuda, but torch sees no CUDA device "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})", file=sys.stderr)
        return 2
    dtypes = None
    if args.dtypes:
        dtypes = []
        for name in args.dtypes:
            dt = getattr(torch, name, None)
            if not isinstance(dt, torch.dtype):
                print(f"diffusion_ext bench: dtype {name!r} is unknown", file=sys.stderr)
                return 2
            dtypes.append(dt)
    if args.threads is not None:
        if args.threads < 1:
            print(f"diffusion_ext bench: --threads must be at least 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    options = bench.default_options(device, args.quick)
    load_before = bench.load_average()
    if device.type == "cpu" and load_before is not None and load_before > 0.5 * (os.cpu_count() or 1):
        print(f"diffusion_ext bench: the 1-minute load average is {load_before:.2f} on {os.cpu_count()} CPUs; "
              "other work competes for the cores and the CPU timings will be noisy", file=sys.stderr)

    progress = None
    if sys.stderr.isatty():
        def progress(r):
            took = f"{r['time_us']:10.1f} µs" if r["time_us"] is not None else f"failed: {r['error']}"
            print(f"  {r['op']:<20} {r['provider']:<8} {bench.shape_name(r['shape']):<14} {r['dtype']:<9} {took}",
                  file=sys.stderr)

    shapes = None
    if args.shapes:
        try:
            shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes]
        except ValueError:
            print(f"diffusion_ext bench: --shapes {','.join(args.shapes)}: expected shapes like 256x4x128x128",
                  file=sys.stderr)
            return 2
    try:
        rows = bench.run_table(device, dtypes=dtypes, shapes=shapes, ops=args.ops, providers=args.providers,
                               options=options,
                               compile_cpu=args.compile, tune_malloc=not args.default_malloc, on_row=progress)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    env = bench.environment_markdown(device, options, load_before)
    table = bench.format_markdown(rows)
    print(env)
    print(table, end="")
    if args.markdown:
        ops_doc = "\n".join(f"- `{name}`: {desc}" for name, (desc, _) in bench.OPS.items() if name in
                            {r["op"] for r in rows})
        title = "quick run (few repetitions, not a measurement)" if args.quick else "measured"
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(f"# diffusion_ext schedule ops on {device.type}: {title}\n\n")
            f.write(f"Written by `python -m diffusion_ext bench` on {datetime.date.today().isoformat()}.\n\n")
            f.write(env + "\n" + ops_doc + "\n\n" + table)
        print(f"\nwrote {args.markdown}", file=sys.stderr)
    return 0


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _csv(value))


def _error(cmd: str, msg: str) -> int:
    # the library's messages may name the command already ("train: ...", "train --resume: ..."): say it once
    named = msg.startswith((f"{cmd}: ", f"{cmd} --"))
    print(f"diffusion_ext {msg}" if named else f"diffusion_ext {cmd}: {msg}", file=sys.stderr)
    return 2


def _check_out(cmd: str, check) -> int:
    """Runs an output-path check (out_paths) before any work: 0, or 2 after a clear error."""
    try:
        check()
    except ValueError as e:
        return _error(cmd, f"{e}; nothing was done")
    return 0


def _device(args):
    import torch

    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load_trained(cmd: str, args, task: str | None = None):
    """The model of --checkpoint on --device (eager with --eager), or an exit code after a clear error
    (unreadable or foreign checkpoint, or a model of another task than `task`)."""
    from .checkpoint import CheckpointError
    from .train import load_trained

    try:
        m = load_trained(args.checkpoint, _device(args), fused=not args.eager)
    except (CheckpointError, ValueError) as e:
        return _error(cmd, str(e))
    if task is not None and m.task != task:
        return _error(cmd, f"{args.checkpoint} is a {m.task} model, not a {task} model (--task {task})")
    return m


# ----------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------
def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a pixel, VAE, latent or depth diffusion model",
        description="Trains with Adam, an EMA of the weights (used for sampling), mixed precision on GPU, "
                    "gradient clipping and accumulation. Writes OUT/checkpoint.pt every --ckpt-every steps and "
                    "on Ctrl-C (the current step finishes first; then it exits with 130), OUT/log.jsonl, sample "
                    "grids OUT/samples/*.png, OUT/loss.png and the EMA weights OUT/weights.{pt,safetensors}. A "
                    "folder that holds a run is never written over: --resume continues it, --overwrite moves it "
                    "aside. Several GPUs or nodes: "
                    "torchrun --nproc_per_node=G -m diffusion_ext train ... (DDP; --batch-size is the global batch).",
        argument_default=argparse.SUPPRESS,  # only the options given reach TrainConfig (and a resumed run)
    )
    a = p.add_argument
    a("--task", choices=("pixel", "vae", "latent", "depth"),
      help="pixel: DDPM on images; vae: the first stage of latent diffusion; latent: DDPM in a VAE's latent space "
           "(needs --vae); depth: depth maps conditioned on RGB images")
    a("--data", metavar="PATH|builtin:NAME", help="builtin:shapes, builtin:depth-scenes, an image folder, NYU Depth V2")
    a("--out", metavar="DIR", help="output directory (default runs/<task>)")
    a("--resume", nargs="?", const=True, metavar="CKPT",
      help="continue the run in OUT (its checkpoint.pt; or from CKPT, writing into OUT) with its configuration; "
           "--steps may extend the run")
    a("--overwrite", action="store_true",
      help="if OUT already holds a run, move it aside to OUT.old-<time> and start afresh (without it, a run "
           "folder is never written over)")
    a("--image-size", dest="image_size", type=int, help="side of the square images (default 64)")
    a("--data-size", dest="data_size", type=int, help="number of items of a builtin data set")
    a("--max-bad-fraction", dest="max_bad_fraction", type=float, metavar="F",
      help="image folders: the largest fraction of unreadable files that are skipped before training stops "
           "with an error naming them, default 0.1")
    g = p.add_argument_group("model")
    g.add_argument("--base-channels", dest="base_channels", type=int, help="default 64")
    g.add_argument("--channel-mults", dest="channel_mults", type=_ints, metavar="M,M,...",
                   help="UNet default 1,2,2,2; VAE default 1,2,4")
    g.add_argument("--num-res-blocks", dest="num_res_blocks", type=int, help="default 2")
    g.add_argument("--attention-resolutions", dest="attention_resolutions", type=_ints, metavar="R,...",
                   help="default 16 (when it occurs)")
    g.add_argument("--dropout", type=float, help="default 0.1")
    g.add_argument("--head-dim", dest="head_dim", type=int, help="default 32")
    g.add_argument("--num-groups", dest="num_groups", type=int, help="GroupNorm groups, default 32")
    g.add_argument("--latent-channels", dest="latent_channels", type=int, help="VAE latent channels, default 4")
    g.add_argument("--class-cond", dest="class_cond", action="store_true",
                   help="condition on the data set's labels, dropping them with --p-uncond (classifier-free guidance)")
    g.add_argument("--p-uncond", dest="p_uncond", type=float, help="default 0.1")
    g.add_argument("--eager", dest="fused", action="store_false", help="build the eager model (fused=False)")
    g.add_argument("--backbone", choices=("native", "diffusers"),
                   help="pixel: 'diffusers' trains a diffusers UNet2DModel with the same options, patched onto the "
                        "fused kernels (unpatched with --eager); export it with `export --format diffusers`")
    g = p.add_argument_group("diffusion")
    g.add_argument("--num-timesteps", dest="num_timesteps", type=int, help="default 1000")
    g.add_argument("--beta-schedule", dest="beta_schedule", choices=("linear", "scaled_linear", "cosine"))
    g.add_argument("--prediction-type", dest="prediction_type", choices=("epsilon", "sample", "v_prediction"))
    g.add_argument("--snr-gamma", dest="snr_gamma", type=float,
                   help="weight each timestep's loss by Min-SNR-γ (Hang et al. 2023; they use 5); default off")
    g.add_argument("--vae", metavar="CKPT", help="latent: the trained VAE (a checkpoint of --task vae)")
    g.add_argument("--kl-weight", dest="kl_weight", type=float, help="vae: β of the KL term, default 1e-3")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="optimizer steps, default 10000")
    g.add_argument("--batch-size", dest="batch_size", type=int, help="global batch per step, default 64")
    g.add_argument("--grad-accum", dest="grad_accum", type=int, help="micro-batches per step, default 1")
    g.add_argument("--lr", type=float, help="Adam learning rate, default 1e-4")
    g.add_argument("--lr-warmup", dest="lr_warmup", type=int, help="linear warm-up steps, default 0")
    g.add_argument("--lr-decay", dest="lr_decay", choices=("none", "cosine"),
                   help="after the warm-up: none (constant, the default) or cosine (to 0 at --steps)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, help="AdamW weight decay, default 0 (Adam)")
    g.add_argument("--clip-grad", dest="clip_grad", type=float, help="max grad norm, default 1 (0: off)")
    g.add_argument("--ema-decay", dest="ema_decay", type=float, help="default 0.9999")
    g.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_false",
                   help="constant EMA decay (default: min(decay, (1+n)/(10+n)))")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 (fp16 with a grad scaler where bf16 is missing) on GPU, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--channels-last", dest="channels_last", action="store_true", help="NHWC memory format")
    g.add_argument("--seed", type=int, help="default 0")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default cuda if available); torchrun: cuda:LOCAL_RANK")
    g.add_argument("--num-workers", dest="num_workers", type=int, help="DataLoader workers, default 0")
    g = p.add_argument_group("output")
    g.add_argument("--ckpt-every", dest="ckpt_every", type=int, help="default 1000")
    g.add_argument("--log-every", dest="log_every", type=int, help="JSONL record every k steps, default 1")
    g.add_argument("--sample-every", dest="sample_every", type=int, help="sample grid every N steps, default 1000")
    g.add_argument("--num-samples", dest="num_samples", type=int, help="images per grid, default 16")
    g.add_argument("--sample-steps", dest="sample_steps", type=int, help="sampler steps of the grids, default 50")
    g.add_argument("--sample-sampler", dest="sample_sampler", choices=_samplers(),
                   help="sampler of the grids, default ddim")
    g.add_argument("--sample-spacing", dest="sample_spacing", choices=_spacings(),
                   help=SPACING_HELP.replace("the sampler", "the grids' sampler"))
    g.add_argument("--save-format", dest="save_format", choices=("pt", "safetensors"),
                   help="format of the exported EMA weights, default pt")
    g.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    g.add_argument("--progress-every", dest="progress_every", type=float, metavar="SECONDS",
                   help="when stdout is not a terminal (nohup, a batch job): a progress line (step, loss, it/s, "
                        "ETA) after the first step, then every SECONDS, default 30")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .checkpoint import CheckpointError
    from .train import TrainConfig, train

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "resume", "overwrite")}
    resume = getattr(args, "resume", False)
    if not resume:
        for name in ("task", "data"):
            if name not in given:
                return _error("train", f"--{name} is required (unless --resume)")
    if "out" not in given:  # the run's folder
        if isinstance(resume, str):
            given["out"] = os.path.dirname(resume) or "."
        elif "task" in given:
            given["out"] = os.path.join("runs", given["task"])
        else:
            return _error("train", "--resume needs the run's folder: --out DIR (or --task T for runs/T)")
    try:
        cfg = TrainConfig(**given)
        summary = train(cfg, resume=resume, overrides=given if resume else None,
                        overwrite=getattr(args, "overwrite", False))
    except (ValueError, CheckpointError, OSError) as e:
        return _error("train", str(e))
    except KeyboardInterrupt:  # a second Ctrl-C, or one during set-up: nothing more is saved
        print(f"diffusion_ext train: aborted without saving; the last checkpoint in {given['out']} (if any) is "
              f"intact: continue with --resume --out {given['out']}", file=sys.stderr)
        return 130
    if summary.get("loss_curve"):  # rank 0
        if summary["interrupted"]:
            print(f"interrupted after step {summary['step']}; checkpoint {summary['checkpoint']}; continue with "
                  f"--resume --out {summary['out']}")
        else:
            extra = "".join(f", {k} {v:.4g}" for k, v in summary.items()
                            if k in ("valid_fraction", "recon_mse", "depth_mse"))
            print(f"trained {summary['step']} steps{extra}; checkpoint {summary['checkpoint']}, weights "
                  f"{summary['weights']}, samples {summary['samples']}, loss curve {summary['loss_curve']}")
    return summary["exit_code"]


# ----------------------------------------------------------------------------------------------------
# sample
# ----------------------------------------------------------------------------------------------------
def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a trained model (its EMA weights) into a PNG grid",
                       description="Loads a training checkpoint or exported weights (pixel or latent task) and "
                                   "writes a grid of samples.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--sampler", choices=_samplers(), default="ddim", help=SAMPLER_HELP)
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: 50 for ddim, 20 for dpmpp_2m and dpmpp_2m_sde, T for ddpm)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η (0: deterministic; ddim only)")
    p.add_argument("--spacing", choices=_spacings(), default=None, help=SPACING_HELP)
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance scale (a class-conditional model, --class-cond)")
    p.add_argument("--label", type=int, default=None, help="class of every sample (default: cycle through classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--eager", action="store_true", help="the eager model (fused=False)")
    p.add_argument("--cuda-graph", dest="cuda_graph", action="store_true",
                   help="CUDA: capture the sampling step in a CUDA graph and replay it for every step")
    p.add_argument("--out", default="samples.png", metavar="GRID.png", help="the PNG grid (default samples.png)")
    p.set_defaults(func=_run_sample)


def _run_sample(args) -> int:
    import torch

    from .images import save_grid

    device = _device(args)
    if args.num < 1:
        return _error("sample", f"--num must be at least 1, got {args.num}")
    bad = _check_out("sample", lambda: check_out_file(args.out, "--out", (".png",), "PNG file"))
    if bad:
        return bad
    m = _load_trained("sample", args)
    if isinstance(m, int):
        return m
    if m.task in ("vae", "depth"):
        return _error("sample", f"{args.checkpoint} is a {m.task} model; sample takes pixel or latent models "
                                f"(depth: predict-depth)")
    n_cls = m.model.num_classes
    y = None
    if n_cls is not None:
        y = torch.arange(args.num, device=device) % n_cls if args.label is None else \
            torch.full((args.num,), args.label, dtype=torch.long, device=device)
        if args.label is not None and not 0 <= args.label < n_cls:
            return _error("sample", f"--label {args.label} is outside 0..{n_cls - 1}")
    elif args.guidance is not None or args.label is not None:
        return _error("sample", "--guidance and --label need a class-conditional model (trained with --class-cond)")
    kw = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, spacing=args.spacing, guidance_scale=args.guidance,
              y=y, seed=args.seed, device=device, cuda_graph=args.cuda_graph)
    try:
        if m.latent is not None:
            images = m.latent.sample(m.model, args.num, **kw)
        else:
            size = m.model.config["image_size"]
            images = m.diffusion.sample(m.model, (args.num, m.model.config["out_channels"], size, size), **kw)
    except ValueError as e:
        return _error("sample", str(e))
    save_grid(images.float().cpu(), args.out)
    print(f"wrote {args.out} ({args.num} samples, {args.sampler}, step {m.meta.get('step')})")
    return 0


# ----------------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------------
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny DDPM on builtin:shapes on CPU, sample it, time fused vs eager",
                       description="Trains a small pixel DDPM on builtin:shapes for 600 steps of batch 32 (a few "
                                   "minutes on a laptop CPU; README.md has measured times), samples it with DDIM "
                                   "into a PNG grid, prints the fraction of samples the shapes checker accepts next "
                                   "to that of pure noise, and the time of one training step and one sampling step "
                                   "of the fused model against the eager one (the minimum of interleaved "
                                   "repetitions, with how busy the machine was meanwhile).")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="the run's folder (default runs/demo)")
    p.add_argument("--overwrite", action="store_true",
                   help="if DIR already holds a run (an earlier demo), move it aside to DIR.old-<time> first")
    p.add_argument("--steps", type=int, default=None, help="training steps, default 600")
    p.add_argument("--image-size", dest="image_size", type=int, choices=(16, 32), default=16)
    p.add_argument("--num-samples", dest="num_samples", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch.set_num_threads(N); by default every CPU this process may use when the others are "
                        "idle as the demo starts, else one fewer (at least 1), so that no thread waits for a core "
                        "another process holds")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from . import demo

    return demo.main(args)


# ----------------------------------------------------------------------------------------------------
# predict-depth, eval-depth
# ----------------------------------------------------------------------------------------------------
def _add_predict_depth(sub) -> None:
    p = sub.add_parser("predict-depth", help="predict a depth map for an image with a trained depth model",
                       description="Samples depth conditioned on the image (any --sampler); with --ensemble K the "
                                   "per-pixel median of K samples. Writes a colour-mapped depth PNG.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("--image", required=True, metavar="IMG.png")
    p.add_argument("--out", default=None, metavar="DEPTH.png", help="default: IMG_depth.png beside the input")
    p.add_argument("--ensemble", type=int, default=1, metavar="K")
    p.add_argument("--sampler", choices=_samplers(), default="ddim", help=SAMPLER_HELP)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--eager", action="store_true", help="the eager model (fused=False)")
    p.set_defaults(func=_run_predict_depth)


def _run_predict_depth(args) -> int:
    import torch

    from . import depth_tools
    from .images import depth_to_rgb, load_image, make_grid, save_png

    device = _device(args)
    if args.ensemble < 1:
        return _error("predict-depth", f"--ensemble must be at least 1, got {args.ensemble}")
    out = args.out or os.path.splitext(args.image)[0] + "_depth.png"
    bad = _check_out("predict-depth", lambda: check_out_file(out, "--out" if args.out else "the default --out",
                                                             (".png",), "PNG file"))
    if bad:
        return bad
    m = _load_trained("predict-depth", args, task="depth")
    if isinstance(m, int):
        return m
    try:
        image = load_image(args.image, m.model.config["image_size"])
    except (OSError, ValueError) as e:
        return _error("predict-depth", f"cannot read --image {args.image}: {e}")
    depth_m = depth_tools.predict(m, image[None].to(device), ensemble=args.ensemble, sampler=args.sampler,
                                  steps=args.steps, seed=args.seed)
    save_png(make_grid(depth_to_rgb(depth_m.cpu()), nrow=1, padding=0), out, scale=max(1, 256 // image.shape[-1]))
    print(f"wrote {out}: depth {float(depth_m.min()):.2f}–{float(depth_m.max()):.2f} m "
          f"(near is yellow, far is dark), ensemble of {args.ensemble}")
    return 0


def _add_eval_depth(sub) -> None:
    p = sub.add_parser("eval-depth", help="evaluate a depth model: δ1..3, REL, SqRel, RMS, RMSlog, log10",
                       description="Predicts depth for a data set's test split and prints the standard metrics "
                                   "(Eigen et al. 2014), written also as JSON and markdown, with a PNG of "
                                   "image / ground truth / prediction rows.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("--data", required=True, metavar="PATH|builtin:depth-scenes")
    p.add_argument("--split", default="test")
    p.add_argument("--data-size", dest="data_size", type=int, default=None, help="items of a builtin data set")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    p.add_argument("--eigen-crop", dest="eigen_crop", action="store_true", help="the Eigen crop of NYU")
    p.add_argument("--pooled", action="store_true", help="pool pixels over the data set (default: mean per image)")
    p.add_argument("--align", choices=("none", "scale", "scale_shift"), default="none",
                   help="least-squares alignment of each prediction to the ground truth first")
    p.add_argument("--ensemble", type=int, default=1, metavar="K")
    p.add_argument("--sampler", choices=_samplers(), default="ddim", help=SAMPLER_HELP)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, metavar="DIR", help="default: beside the checkpoint")
    p.add_argument("--eager", action="store_true", help="the eager model (fused=False)")
    p.set_defaults(func=_run_eval_depth)


def _run_eval_depth(args) -> int:
    import torch

    from . import depth_tools

    device = _device(args)
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    bad = _check_out("eval-depth", lambda: check_out_dir(out, "--out" if args.out else "the default --out"))
    if bad:
        return bad
    m = _load_trained("eval-depth", args, task="depth")
    if isinstance(m, int):
        return m
    try:
        result = depth_tools.evaluate(m, args.data, split=args.split, data_size=args.data_size, limit=args.limit,
                                      batch_size=args.batch_size, eigen_crop=args.eigen_crop, pooled=args.pooled,
                                      align=args.align, ensemble=args.ensemble, sampler=args.sampler,
                                      steps=args.steps, seed=args.seed, out_dir=out)
    except (ValueError, FileNotFoundError) as e:
        return _error("eval-depth", str(e))
    print(result["markdown"], end="")
    print(f"\nwrote {result['json']}, {result['md']}, {result['png']}")
    return 0


# ----------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------
def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a trained model in another library's format (diffusers)",
                       description="--format diffusers: the EMA weights of a run trained with --backbone diffusers "
                                   "and its noise schedule as a folder that DDPMPipeline.from_pretrained and "
                                   "DDIMPipeline.from_pretrained load with diffusers alone.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a training checkpoint or exported weights")
    p.add_argument("--format", dest="fmt", choices=("diffusers",), required=True)
    p.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty directory (or an earlier export)")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from .checkpoint import CheckpointError

    try:
        from .integrations.diffusers_export import export
    except ImportError as e:
        return _error("export", str(e))
    try:
        out = export(args.checkpoint, args.out_dir, args.fmt)
    except (ValueError, CheckpointError) as e:
        return _error("export", str(e))
    note = " (class-conditional: call its unet with class_labels; DDPMPipeline passes none)" \
        if out["class_conditional"] else ""
    print(f"wrote {out['out']}: {out['pipeline']} at step {out['step']}, loadable with "
          f"DDPMPipeline.from_pretrained / DDIMPipeline.from_pretrained{note}")
    return 0


# ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffusion_ext",
                                     description="Fused diffusion ops: benchmarks, training and sampling.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_bench(sub)
    _add_train(sub)
    _add_sample(sub)
    _add_demo(sub)
    _add_predict_depth(sub)
    _add_eval_depth(sub)
    _add_export(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
