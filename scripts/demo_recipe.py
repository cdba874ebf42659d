#!/usr/bin/env python
"""Which training recipe makes the demo's model learn most in its budget: trains the demo's configuration
(diffusion_ext.demo.demo_config) with some options changed, for a fixed number of steps, and samples each
model with several sampler settings from the same x_T, reporting the fraction the shapes checker accepts.

    PYTHONPATH=. python scripts/demo_recipe.py --variant old='{"snr_gamma": null, "lr_decay": "none"}' --variant demo='{}' \\
        --seeds 0 1 --steps 600 --jsonl /tmp/recipe.jsonl --results benchmarks/results/demo-recipe-cpu-$(date +%F).md

A variant is NAME=JSON, the JSON an object of TrainConfig fields to override ('{}': the demo as it is).
Every record (variant, seed, sampler setting, accepted fraction, training seconds) is appended to --jsonl,
so that runs made separately (one per core: --threads 1) land in one table; --results writes the markdown
table of every record in the file. The accepted fraction of n samples carries a standard error
√(p(1−p)/n); different training seeds move it further (the table shows each seed).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

# (name, Diffusion.sample keywords): the demo's own setting first
SETTINGS = {
    "ddim 50 trailing": dict(sampler="ddim", steps=50, spacing="trailing"),
    "ddim 25 leading": dict(sampler="ddim", steps=25, spacing="leading"),
    "ddim 25 trailing η=1": dict(sampler="ddim", steps=25, spacing="trailing", eta=1.0),
}


def variant(text: str) -> tuple[str, dict]:
    name, _, js = text.partition("=")
    overrides = json.loads(js or "{}")
    if not name or not isinstance(overrides, dict):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=JSON-object")
    return name, overrides


def run_one(name: str, overrides: dict, seed: int, args) -> list[dict]:
    from diffusion_ext.data.shapes import valid_fraction
    from diffusion_ext.demo import demo_config
    from diffusion_ext.train import load_trained, train

    out = os.path.join(args.out, f"{name}-seed{seed}")
    cfg = demo_config(out, 16, args.steps, seed, 8, True, True, "cpu")
    cfg.ckpt_every = args.steps
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise SystemExit(f"demo_recipe: variant {name}: TrainConfig has no field {k!r}")
        setattr(cfg, k, tuple(v) if isinstance(v, list) else v)
    t0 = time.perf_counter()
    summary = train(cfg.validate(), log=lambda *a: None)
    train_s = time.perf_counter() - t0
    m = load_trained(summary["checkpoint"], "cpu")
    records = []
    for setting, kw in SETTINGS.items():
        x = m.diffusion.sample(m.model, (args.num_samples, 3, 16, 16), seed=args.sample_seed, **kw)
        records.append({"variant": name, "overrides": overrides, "seed": seed, "steps": args.steps,
                        "setting": setting, "accepted": valid_fraction(x), "n": args.num_samples,
                        "train_s": round(train_s, 1), "threads": torch.get_num_threads()})
        print(json.dumps(records[-1]), flush=True)
    return records


def markdown(records: list[dict]) -> str:
    settings = list(dict.fromkeys(r["setting"] for r in records))
    rows = {}
    for r in records:
        rows.setdefault((r["variant"], r["seed"], r["steps"]), {})[r["setting"]] = r
    lines = ["| variant (TrainConfig overrides of the demo) | seed | steps | training s (threads) | "
             + " | ".join(settings) + " |", "|---|---|---|---|" + "---|" * len(settings)]
    for (name, seed, steps), by in rows.items():
        any_r = next(iter(by.values()))
        cells = []
        for s in settings:
            r = by.get(s)
            if r is None:
                cells.append("")
                continue
            p, n = r["accepted"], r["n"]
            cells.append(f"{p:.3f} ± {(p * (1 - p) / n) ** 0.5:.3f}")
        lines.append(f"| {name} `{json.dumps(any_r['overrides'])}` | {seed} | {steps} | {any_r['train_s']:.0f} "
                     f"({any_r['threads']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", type=variant, action="append", default=[], metavar="NAME=JSON")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--sample-seed", type=int, default=0, help="x_T of every setting: Philox stream (seed, 0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/demo_recipe", help="folder of the training runs")
    p.add_argument("--jsonl", required=True, help="records are appended here")
    p.add_argument("--results", help="write the markdown table of every record in --jsonl here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name, overrides in args.variant:
        for seed in args.seeds:
            with open(args.jsonl, "a") as f:
                for r in run_one(name, overrides, seed, args):
                    f.write(json.dumps(r) + "\n")
    if args.results:
        with open(args.jsonl) as f:
            records = [json.loads(line) for line in f if line.strip()]
        with open(args.results, "w") as f:
            f.write(f"# The demo's training recipe, {datetime.date.today()}\n\nWritten by `scripts/demo_recipe.py` "
                    f"(`{' '.join(sys.argv)}` and the runs appended to its JSONL). Shapes checker acceptance of "
                    f"{records[0]['n'] if records else 0} samples of 16×16 per cell, ± one standard error; every "
                    "cell of a row samples the same model from the same x_T.\n\n" + markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
