"""How many torch threads the demo should use: its training step (fused model, batch 32, 16×16) at each
thread count, with the machine as it is and with one core kept busy by a spinning process this script
starts (and stops), timed interleaved (diffusion_ext.timing: min of N, with the machine's load).

    python benchmarks/demo_threads.py [--reps 15] [--threads 1,2]

OpenMP threads that wait for a core another process holds run several times slower: the demo's thread
count must not collapse when one core is busy. No assertion here is about time; it prints a table.
"""
import argparse
import os
import subprocess
import sys

import torch

from diffusion_ext import timing
from diffusion_ext.demo import DEMO_BATCH, demo_config, fused_available, step_fns
from diffusion_ext.models import build_model
from diffusion_ext.train import build_diffusion, model_spec


def measure(reps: int, threads: list[int]) -> timing.Timing:
    cfg = demo_config("unused", 16, 1, 0, 16, True, True, "cpu")
    kind, mc = model_spec(cfg, None)
    sd = build_model(kind, mc).state_dict()
    fused = fused_available(torch.device("cpu"))[0]
    train_step = step_fns(mc, sd, build_diffusion(cfg.to_dict(), "cpu"), "cpu", DEMO_BATCH, fused)[0]

    def at(n):
        def run():
            torch.set_num_threads(n)
            train_step()
        return run

    return timing.interleaved({f"{n} thread{'s' if n > 1 else ''}": at(n) for n in threads}, reps, warmup=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", default=f"1,{os.cpu_count()}")
    args = p.parse_args()
    threads = sorted({int(v) for v in args.threads.split(",")})
    print(f"demo training step (batch {DEMO_BATCH}, 16×16), {os.cpu_count()} CPUs, torch {torch.__version__}")
    print("| condition | " + " | ".join(f"{n} thread(s): min ms (spread)" for n in threads) + " |")
    print("|---|" + "---|" * len(threads))
    for cond in ("as found", "one core busy (a spinning process)"):
        spinner = None
        if cond != "as found":
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            t = measure(args.reps, threads)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        cells = [f"{t.min(n) * 1e3:.1f} ({t.spread(n):.0%})" for n in t.times]
        print(f"| {cond} | " + " | ".join(cells) + f" |\n  {t.load.describe()}")


if __name__ == "__main__":
    main()
