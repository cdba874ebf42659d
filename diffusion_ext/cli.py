"""`python -m diffusion_ext <command>`: the command line of diffusion_ext.

Commands are argparse subcommands, each registered by a small `_add_<name>` function that sets its
handler with set_defaults(func=...), so that later commands (train, sample, demo) slot in beside `bench`.
Handlers import what they need lazily: `--help` and one command never pay for another's imports.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


# ----------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------
def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time the schedule ops against eager PyTorch",
        description="Times q_sample, q_sample_with_noise, ddpm_step (with and without guidance) and ddim_step "
                    "for every provider (eager, compile, and each diffusion_ext backend for the device) and "
                    "prints time, effective GB/s and the ratio to eager measured in the same run.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device to measure on (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="few repetitions: a smoke test, not a measurement")
    p.add_argument("--markdown", metavar="OUT.md", help="also write the table, with the environment, to this file")
    p.add_argument("--ops", type=_csv, default=None, metavar="OP[,OP...]",
                   help="only these ops (q_sample, q_sample_with_noise, ddpm_step, ddpm_step_cfg, ddim_step)")
    p.add_argument("--providers", type=_csv, default=None, metavar="P[,P...]",
                   help="only these providers (eager is always measured: the ratios need it)")
    p.add_argument("--dtypes", type=_csv, default=None, metavar="DTYPE[,DTYPE...]",
                   help="e.g. float32,bfloat16 (default: float32 on CPU; float32, float16, bfloat16 on GPU)")
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
            print(f"  {r['op']:<20} {r['provider']:<8} {bench.shape_name(r['shape']):<14} {r['dtype']:<9} "
                  f"{r['time_us']:10.1f} µs", file=sys.stderr)

    try:
        rows = bench.run_table(device, dtypes=dtypes, ops=args.ops, providers=args.providers, options=options,
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


# ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffusion_ext",
                                     description="Fused diffusion ops: benchmarks and tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
