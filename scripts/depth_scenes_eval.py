#!/usr/bin/env python
"""A longer depth run: train the conditional U-Net on builtin:depth-scenes (64×64 by default) through the
command line, evaluate it with eval-depth on held-out scenes (the test split), and write the table with
the exact commands, the device and the configuration to a markdown file.

    PYTHONPATH=. python scripts/depth_scenes_eval.py --steps 400 --threads 1 \
        --results benchmarks/results/depth-scenes-cpu-$(date +%F).md

Besides the model, two baselines are evaluated on the same held-out images, so that the numbers mean
something: the best constant depth (the c on a 0.05 m grid maximising the mean per-image δ1, chosen with
the test labels: an upper bound on every constant predictor) and the per-pixel mean depth map of the
training images (a constant image that knows the room's usual layout). A trained model must beat both.
Defaults take about 10 minutes on one CPU core; on a GPU, raise --steps and --batch-size.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_line(device: str) -> str:
    if device.startswith("cuda"):
        return f"GPU {torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return f"CPU {cpu_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def baselines(data_size: int, eval_size: int, image_size: int, seed: int) -> dict:
    """depth_metrics of the best constant and of the training set's mean depth map on the held-out images."""
    from diffusion_ext.data import build_dataset
    from diffusion_ext.metrics import depth_metrics

    collate = torch.utils.data.default_collate
    test = build_dataset("builtin:depth-scenes", image_size=image_size, split="test", seed=seed, size=eval_size)
    b = collate([test[i] for i in range(len(test))])
    gt, valid = b["depth_m"], b["valid"]
    grid = torch.arange(0.5, 10.001, 0.05).tolist()
    _, c = max((depth_metrics(torch.full_like(gt, c), gt, valid)["d1"], c) for c in grid)
    train = build_dataset("builtin:depth-scenes", image_size=image_size, split="train", seed=seed, size=data_size)
    n = min(len(train), 512)
    tb = collate([train[i] for i in range(n)])
    mean_map = (tb["depth_m"] * tb["valid"]).sum(0) / tb["valid"].sum(0).clamp_min(1)
    return {f"best constant ({c:.2f} m)": depth_metrics(torch.full_like(gt, c), gt, valid),
            f"mean depth map of {n} training images": depth_metrics(mean_map.expand_as(gt).contiguous(), gt, valid)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/depth-scenes-64")
    p.add_argument("--results", default=None, metavar="FILE.md", help="write the table here (default: OUT/result.md)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--channel-mults", default="1,2,2,2")
    p.add_argument("--data-size", type=int, default=4096)
    p.add_argument("--eval-size", type=int, default=64, help="held-out scenes to evaluate")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the predictions")
    p.add_argument("--ensemble", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusion_ext.cli import main as cli
    from diffusion_ext.metrics import format_markdown

    train_cmd = ["train", "--task", "depth", "--data", "builtin:depth-scenes", "--out", args.out,
                 "--image-size", str(args.image_size), "--data-size", str(args.data_size),
                 "--base-channels", str(args.base_channels), "--channel-mults", args.channel_mults,
                 "--num-res-blocks", "1", "--dropout", "0", "--num-groups", "8",
                 "--beta-schedule", "cosine", "--prediction-type", "v_prediction",
                 "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                 "--lr-warmup", "50", "--ema-decay", "0.995", "--seed", str(args.seed), "--device", args.device,
                 "--ckpt-every", str(max(1, args.steps // 2)), "--sample-every", "0", "--num-samples", "8",
                 "--sample-steps", str(args.sample_steps), "--quiet"]
    eval_cmd = ["eval-depth", "--checkpoint", os.path.join(args.out, "checkpoint.pt"), "--data",
                "builtin:depth-scenes", "--data-size", str(args.eval_size), "--steps", str(args.sample_steps),
                "--ensemble", str(args.ensemble), "--device", args.device, "--out", args.out]
    t0 = time.perf_counter()
    if cli(train_cmd) != 0:
        return 1
    t1 = time.perf_counter()
    if cli(eval_cmd) != 0:
        return 1
    t2 = time.perf_counter()
    with open(os.path.join(args.out, "eval_depth.json")) as f:
        model = json.load(f)["metrics"]
    base = baselines(args.data_size, args.eval_size, args.image_size, args.seed)
    with open(os.path.join(args.out, "config.json")) as f:
        config = json.load(f)
    losses = [json.loads(line)["loss"] for line in open(os.path.join(args.out, "log.jsonl")) if '"loss"' in line]
    k = max(1, len(losses) // 10)
    table = format_markdown({"diffusion model (EMA)": model, **base})
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "scripts/depth_scenes_eval.py", *argv])
    text = (f"# Depth on builtin:depth-scenes ({args.image_size}×{args.image_size}), {args.device}\n\n"
            f"Written by `scripts/depth_scenes_eval.py` on {datetime.date.today().isoformat()}.\n\n"
            f"Command: `PYTHONPATH=. {command}`\n\n"
            f"- device: {device_line(args.device)}\n"
            f"- training: {args.steps} steps of batch {args.batch_size} ({t1 - t0:.0f} s), mean loss of the first / "
            f"last 10 % of steps {sum(losses[:k]) / k:.4f} / {sum(losses[-k:]) / k:.4f}\n"
            f"- evaluation: {args.eval_size} held-out scenes (test split), DDIM {args.sample_steps} steps, "
            f"ensemble {args.ensemble} ({t2 - t1:.0f} s); metrics per image over valid pixels, then averaged; "
            f"no crop, no alignment\n"
            f"- baselines: the best constant is chosen on the held-out labels (grid 0.5..10 m, step 0.05, "
            f"max mean δ1): an upper bound on any constant prediction\n"
            f"- train: `python -m diffusion_ext {shlex.join(train_cmd)}`\n"
            f"- eval: `python -m diffusion_ext {shlex.join(eval_cmd)}`\n"
            f"- model config: `{json.dumps(config['model_config'])}`\n\n"
            f"{table}\n")
    path = args.results or os.path.join(args.out, "result.md")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
