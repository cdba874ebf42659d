#!/usr/bin/env python
"""Quality against sampling steps, per sampler, in one run: trains (or loads) a pixel model on builtin:shapes
and a depth model on builtin:depth-scenes through the command line, then samples both with DDPM (respaced:
DDIM η = 1 off t − 1), DDIM (η = 0) and DPM-Solver++(2M) at 5, 10, 20 and 50 steps and writes a markdown
table of the shapes checker's acceptance rate, the depth δ1 and REL on held-out scenes, and the wall time
per sample of each setting.

    PYTHONPATH=. python scripts/quality_vs_steps.py --results benchmarks/results/quality-vs-steps-cpu-$(date +%F).md

Every sampler of a row sees the same models, the same x_T (Philox stream (seed, 0)), the same timesteps
(--spacing, "trailing" by default: the n model calls at the same t for DDIM and DPM-Solver++, and the
first at t = T − 1) and the same held-out images, so the rows differ only by the solver. The acceptance
rate is a proportion of --num-samples images: its standard error √(p(1−p)/n) is printed beside it. Defaults
take a few minutes on a laptop CPU (small models: quality is far from converged, but the comparison between
samplers of one model is what this measures); raise --shapes-train-steps / --depth-train-steps and
--num-samples for a longer run, or pass --shapes-checkpoint / --depth-checkpoint to reuse trained models.
Wall times are medians over the run's batches; on a machine busy with other work (load average above the
core count, stated in the output) they are noisy, but the ratios between samplers of one run still hold.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import time

import torch


def load_line() -> tuple[float, str]:
    from diffusion_ext.bench import load_average

    load, cores = load_average() or 0.0, os.cpu_count() or 1
    return load, f"load average {load:.1f} on {cores} cores" + (" (busy: other work shared the machine)"
                                                             if load > cores else "")


def train_commands(args) -> dict[str, list[str]]:
    """The `python -m diffusion_ext train` arguments of the two models: the demo's small U-Net recipe
    (cosine schedule, v-prediction: fast to learn on CPU)."""
    common = ["--base-channels", "32", "--num-res-blocks", "1", "--dropout", "0", "--num-groups", "8",
              "--beta-schedule", "cosine", "--prediction-type", "v_prediction", "--lr", "2e-3", "--lr-warmup", "50",
              "--ema-decay", "0.995", "--seed", str(args.seed), "--device", args.device, "--sample-every", "0",
              "--num-samples", "8", "--quiet"]
    shapes = ["train", "--task", "pixel", "--data", "builtin:shapes", "--out", os.path.join(args.out, "shapes"),
              "--image-size", str(args.shapes_size), "--data-size", "4096", "--channel-mults", "1,2,2",
              "--attention-resolutions", "", "--steps", str(args.shapes_train_steps), "--batch-size", "32",
              "--ckpt-every", str(args.shapes_train_steps), *common]
    depth = ["train", "--task", "depth", "--data", "builtin:depth-scenes", "--out", os.path.join(args.out, "depth"),
             "--image-size", str(args.depth_size), "--data-size", "4096", "--channel-mults", "1,2,2",
             "--attention-resolutions", "", "--steps", str(args.depth_train_steps), "--batch-size", "16",
             "--ckpt-every", str(args.depth_train_steps), *common]
    return {"shapes": shapes, "depth": depth}


def median_time(times: list[float]) -> float:
    times = sorted(times)
    return times[len(times) // 2]


def parse_samplers(text: str, spacing: str) -> list[tuple[str, str]]:
    """"ddim,dpmpp_2m:karras" -> [("ddim", spacing), ("dpmpp_2m", "karras")]: a sampler, optionally with a
    spacing of its own after a colon."""
    out = []
    for item in text.split(","):
        name, _, own = item.strip().partition(":")
        out.append((name, own or spacing))
    return out


@torch.no_grad()
def warm_up(trained, shape, cond=None) -> None:
    """One short untimed chain: the first call of a model pays for allocations and kernel set-up."""
    trained.diffusion.sample(trained.model, shape, steps=2, cond=cond, device=next(trained.model.parameters()).device)


@torch.no_grad()
def shapes_row(trained, sampler: str, spacing: str, steps: int, args) -> dict:
    from diffusion_ext.data.shapes import valid_fraction

    S = trained.model.config["image_size"]
    images, times = [], []
    for i in range(0, args.num_samples, args.batch):
        n = min(args.batch, args.num_samples - i)
        t0 = time.perf_counter()
        x = trained.diffusion.sample(trained.model, (n, 3, S, S), sampler=sampler, steps=steps, spacing=spacing,
                                     seed=args.seed + i, device=args.device)
        times.append((time.perf_counter() - t0) / n)
        images.append(x.float().cpu())
    p = float(valid_fraction(torch.cat(images)))
    return {"acceptance": p, "stderr": math.sqrt(p * (1 - p) / args.num_samples), "s_per_sample": median_time(times)}


@torch.no_grad()
def depth_row(trained, test, sampler: str, spacing: str, steps: int, args) -> dict:
    from diffusion_ext.data.common import unit_to_depth
    from diffusion_ext.metrics import depth_metrics

    preds, times = [], []
    for i in range(0, len(test["image"]), args.batch):
        img = test["image"][i:i + args.batch].to(args.device)
        t0 = time.perf_counter()
        # depth_tools.predict's sampling, with this run's spacing
        x = trained.diffusion.sample(trained.model, (img.shape[0], 1, *img.shape[2:]), cond=img, sampler=sampler,
                                     steps=steps, spacing=spacing, seed=args.seed + i, device=args.device)
        times.append((time.perf_counter() - t0) / img.shape[0])
        preds.append(unit_to_depth(x.float().cpu()))
    m = depth_metrics(torch.cat(preds), test["depth_m"], test["valid"])
    return {"d1": float(m["d1"]), "rel": float(m["rel"]), "s_per_sample": median_time(times)}


def markdown(results: list[dict], header: str) -> str:
    rows = ["| sampler | spacing | steps (model calls) | shapes accepted ↑ | depth δ1 ↑ | depth REL ↓ | "
            "s / sample (shapes) | s / sample (depth) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['sampler']} | {r['spacing']} | {r['steps']} | {r['shapes']['acceptance']:.3f} ± "
                    f"{r['shapes']['stderr']:.3f} | {r['depth']['d1']:.3f} | {r['depth']['rel']:.3f} | "
                    f"{r['shapes']['s_per_sample']:.4f} | {r['depth']['s_per_sample']:.4f} |")
    return header + "\n".join(rows) + "\n"


def reading(results: list[dict], spacing: str) -> str:
    """Which DPM-Solver++ step counts match DDIM at its most steps (both with the run's spacing), on each
    measure (within two standard errors of the shapes rates, and within 0.01 of δ1 / REL)."""
    by = {(r["sampler"], r["steps"]): r for r in results if r["spacing"] == spacing}
    if not any(name == "ddim" for name, _ in by) or not any(name == "dpmpp_2m" for name, _ in by):
        return ""
    top = max(s for (name, s) in by if name == "ddim")
    ref = by[("ddim", top)]
    lines = []
    for (name, s), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        if name != "dpmpp_2m":
            continue
        err = 2 * math.hypot(r["shapes"]["stderr"], ref["shapes"]["stderr"])
        shapes_ok = r["shapes"]["acceptance"] >= ref["shapes"]["acceptance"] - err
        depth_ok = r["depth"]["d1"] >= ref["depth"]["d1"] - 0.01 and r["depth"]["rel"] <= ref["depth"]["rel"] + 0.01
        lines.append(f"- DPM-Solver++(2M) at {s} steps vs DDIM at {top}: shapes "
                     f"{'matches' if shapes_ok else 'falls short'} ({r['shapes']['acceptance']:.3f} vs "
                     f"{ref['shapes']['acceptance']:.3f}, ±{err:.3f}), depth {'matches' if depth_ok else 'falls short'} "
                     f"(δ1 {r['depth']['d1']:.3f} vs {ref['depth']['d1']:.3f}, REL {r['depth']['rel']:.3f} vs "
                     f"{ref['depth']['rel']:.3f})")
    return "Against DDIM at its most steps (shapes: within two standard errors; depth: within 0.01):\n\n" + \
        "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/quality-vs-steps", help="where the models are trained")
    p.add_argument("--results", default=None, metavar="FILE.md", help="default: OUT/result.md (and .json beside it)")
    p.add_argument("--steps", default="5,10,20,50", help="sampling steps, comma-separated")
    p.add_argument("--samplers", default="ddpm,ddim,dpmpp_2m",
                   help="comma-separated (also: dpmpp_2m_sde); NAME:SPACING gives one its own spacing "
                        "(e.g. dpmpp_2m:karras)")
    p.add_argument("--spacing", default="trailing",
                   help="NoiseSchedule.timesteps spacing of every sampler (leading, trailing, linspace, karras)")
    p.add_argument("--shapes-checkpoint", default=None, help="a trained builtin:shapes model (skips its training)")
    p.add_argument("--depth-checkpoint", default=None, help="a trained builtin:depth-scenes model (skips its training)")
    p.add_argument("--shapes-train-steps", type=int, default=700)
    p.add_argument("--depth-train-steps", type=int, default=400)
    p.add_argument("--shapes-size", type=int, default=16)
    p.add_argument("--depth-size", type=int, default=32)
    p.add_argument("--num-samples", type=int, default=256, help="shapes samples per setting")
    p.add_argument("--eval-size", type=int, default=64, help="held-out depth scenes per setting")
    p.add_argument("--batch", type=int, default=64, help="samples per sampling call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",")]
    samplers = parse_samplers(args.samplers, args.spacing)

    from diffusion_ext.bench import describe_device
    from diffusion_ext.cli import main as cli
    from diffusion_ext.data import build_dataset
    from diffusion_ext.train import load_trained

    load0, load_text0 = load_line()
    commands = train_commands(args)
    checkpoints, train_s = {}, {}
    for name, given in (("shapes", args.shapes_checkpoint), ("depth", args.depth_checkpoint)):
        if given:
            checkpoints[name] = given
            continue
        t0 = time.perf_counter()
        if cli(commands[name]) != 0:
            return 1
        train_s[name] = time.perf_counter() - t0
        checkpoints[name] = os.path.join(args.out, name, "checkpoint.pt")
    shapes_m = load_trained(checkpoints["shapes"], args.device)
    depth_m = load_trained(checkpoints["depth"], args.device)
    size = depth_m.model.config["image_size"]
    ds = build_dataset("builtin:depth-scenes", image_size=size, split="test", seed=depth_m.config.get("seed", 0),
                       size=args.eval_size)
    test = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])

    results = []
    t_eval = time.perf_counter()
    S = shapes_m.model.config["image_size"]
    warm_up(shapes_m, (2, 3, S, S))
    warm_up(depth_m, (2, 1, size, size), test["image"][:2].to(args.device))
    for sampler, spacing in samplers:
        for n in steps:
            r = {"sampler": sampler, "spacing": spacing, "steps": n,
                 "shapes": shapes_row(shapes_m, sampler, spacing, n, args),
                 "depth": depth_row(depth_m, test, sampler, spacing, n, args)}
            print(f"{sampler:>13} {spacing:>9} {n:>3} steps: shapes {r['shapes']['acceptance']:.3f}, depth δ1 "
                  f"{r['depth']['d1']:.3f} REL {r['depth']['rel']:.3f}", flush=True)
            results.append(r)
    eval_s = time.perf_counter() - t_eval
    load1, load_text1 = load_line()
    from diffusion_ext.data.shapes import valid_fraction

    noise = torch.randn(args.num_samples, 3, S, S, generator=torch.Generator().manual_seed(args.seed)).clamp(-1, 1)
    argv = sys.argv[1:] if argv is None else list(argv)
    trained = "; ".join(f"{k}: {train_s[k]:.0f} s" for k in train_s) or "none (checkpoints given)"
    header = (f"# Quality against sampling steps, {args.device}\n\n"
              f"Written by `scripts/quality_vs_steps.py` on {datetime.date.today().isoformat()}.\n\n"
              f"Command: `PYTHONPATH=. {shlex.join(['python', 'scripts/quality_vs_steps.py', *argv])}`\n\n"
              f"- device: {describe_device(args.device)}, torch {torch.__version__}; {load_text0} at the start, {load_text1} at the end\n"
              f"- models: {json.dumps(checkpoints)}; training time {trained}; sampling and evaluation {eval_s:.0f} s\n"
              + "".join(f"- train {k}: `python -m diffusion_ext {shlex.join(commands[k])}`\n" for k in train_s) +
              f"- shapes: {args.num_samples} samples of {S}×{S} per row, accepted by data.shapes.valid_fraction "
              f"(pure noise: {valid_fraction(noise):.3f}); ± one standard error\n"
              f"- depth: {len(ds)} held-out builtin:depth-scenes images (test split) of {size}×{size}, one sample "
              f"each, metrics per image over valid pixels, then averaged\n"
              f"- every row: the same x_T per sample (Philox stream (seed, 0)), timesteps spaced as its row says; "
              f"DDPM with fewer than T steps is the respaced chain (DDIM η = 1 off t − 1), DDIM η = 0, "
              f"DPM-Solver++(2M) first order at the first and last step; clipping of x̂0 to [−1, 1]\n"
              f"- wall time: median over batches of {args.batch} of seconds per sample, model and sampler"
              f"{', taken on a busy machine: compare rows, not machines' if max(load0, load1) > (os.cpu_count() or 1) else ''}\n\n")
    text = markdown(results, header) + "\n" + reading(results, args.spacing)
    path = args.results or os.path.join(args.out, "result.md")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"results": results, "checkpoints": checkpoints, "args": vars(args)}, f, indent=1)
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
