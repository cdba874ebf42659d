"""Registers, spills, stack and shared memory of every CUDA kernel of a build, from ptxas -v, and the check
CI runs on them: no kernel may spill registers unless ALLOWED_SPILLS lists it, with why and how many bytes.

    DIFFUSION_EXT_PTXAS_VERBOSE=1 FORCE_CUDA=1 pip install -v --no-build-isolation . > build.log 2>&1
    python scripts/cuda_resources.py build.log --arch 90 [--markdown benchmarks/results/cuda-sm90-resources.md]

Exit status 1 when a kernel spills more than allowed, or when the log holds no ptxas report for the arch
(the build was not verbose, or did not compile for it). Spills cost local-memory traffic in the inner
loop; a stack frame without spills (e.g. the slow path of double-precision sin/cos, which reduces its
argument in a local array) is listed but not an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys

# (regular expression searched in the demangled kernel name, arch) -> (bytes of spills accepted, why)
ALLOWED_SPILLS: dict[tuple[str, int], tuple[int, str]] = {
    ("attn_bwd_simt_kernel<float", 90): (24, "the fp32 SIMT backward (the checking path; fp16/bf16 take the "
                                              "tensor-core kernels, which do not spill): 24 bytes with nvcc 13.0"),
    (r"gn_(fwd_cf_fused|cf_apply)_kernel<.*, long, ", 90): (
        40, "the 64-bit-index group-norm variants, taken only for a group of 2^30 elements or more: ptxas saves "
            "a few values around the calls into the fp32/fp64 division slow path (Welford merges, ρ); 8–40 bytes "
            "with nvcc 13.0 (the 32-bit-index variants that every smaller group takes do not spill)"),
    (r"gn_cf_apply_kernel<.*BackwardOp<.*Activation\)0>, c10::Half, 8, int, true>", 90): (
        8, "fp16 FiLM backward without activation in 8-wide packs (the split path of few large groups): ptxas "
           "settles at 40 registers although the launch bounds allow 255 and spills one value of the loop; "
           "8 bytes with nvcc 13.0"),
    (r"gn_fwd_cl_partial_kernel<double, 1>", 90): (
        12, "fp64 channels_last statistics with an odd channel count (fp64 is the checking dtype): registers "
            "saved around the fp64 division slow-path calls of the Welford merges; 12 bytes with nvcc 13.0"),
}

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)a?'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


@dataclasses.dataclass
class Kernel:
    mangled: str
    arch: int
    name: str = ""
    registers: int = -1
    stack_frame: int = 0
    spill_bytes: int = 0
    shared: int = 0


def parse(log: str) -> list[Kernel]:
    kernels: dict[tuple[str, int], Kernel] = {}
    current: Kernel | None = None
    props_for = ""
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            key = (m.group(1), int(m.group(2)))
            current = kernels.setdefault(key, Kernel(*key))
            props_for = ""
        elif m := _PROPS.search(line):
            props_for = m.group(1)
        elif (m := _SPILL.search(line)) and current is not None and props_for == current.mangled:
            current.stack_frame = int(m.group(1))
            current.spill_bytes = int(m.group(2)) + int(m.group(3))
        elif (m := _USED.search(line)) and current is not None:
            current.registers = int(m.group(1))
            current.shared = int(m.group(2) or 0)
    out = list(kernels.values())
    for k, name in zip(out, demangle([k.mangled for k in out])):
        k.name = name
    return out


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None or not names:
        return names
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True)
    return res.stdout.splitlines()


def short(name: str) -> str:
    """The kernel's name and template arguments, without namespaces and the parameter list."""
    name = re.sub(r"\(anonymous namespace\)::|diffusion_ext::|at::|c10::", "", name)
    depth = 0
    for i, ch in enumerate(name):  # cut at the '(' of the parameter list (outside template brackets)
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return name[:i].removeprefix("void ")
    return name


def problems(k: Kernel) -> str:
    if k.spill_bytes == 0:
        return ""
    for (pattern, arch), (allowed, _why) in ALLOWED_SPILLS.items():
        if arch == k.arch and re.search(pattern, k.name) and k.spill_bytes <= allowed:
            return ""
    return f"{k.spill_bytes} bytes of register spills"


def markdown(kernels: list[Kernel], arch: int) -> str:
    lines = [f"# CUDA kernels for sm_{arch}: ptxas -v", "",
             "`DIFFUSION_EXT_PTXAS_VERBOSE=1 FORCE_CUDA=1 pip install -v --no-build-isolation .` then "
             f"`python scripts/cuda_resources.py LOG --arch {arch} --markdown FILE` (CI step 2 runs the check). "
             "Static shared memory only; the attention kernels size theirs dynamically at launch.", "",
             "| kernel | regs | spill B | stack B | static smem B | problem |", "|---|---|---|---|---|---|"]
    for k in sorted(kernels, key=lambda k: short(k.name)):
        lines.append(f"| `{short(k.name)}` | {k.registers} | {k.spill_bytes} | {k.stack_frame} | {k.shared} | "
                     f"{problems(k)} |")
    allowed = [f"- `{p}` (sm_{a}): up to {n} bytes: {why}" for (p, a), (n, why) in ALLOWED_SPILLS.items() if a == arch]
    if allowed:
        lines += ["", "Spills accepted (scripts/cuda_resources.py ALLOWED_SPILLS):", *allowed]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/cuda_resources.py", description=__doc__.split("\n")[0])
    p.add_argument("log", help="a build log with ptxas -v output")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    with open(args.log, errors="replace") as f:
        kernels = [k for k in parse(f.read()) if k.arch == args.arch]
    if not kernels:
        print(f"cuda_resources: no ptxas -v report for sm_{args.arch} in {args.log} (build with "
              "DIFFUSION_EXT_PTXAS_VERBOSE=1 and pip install -v, for that arch)")
        return 1
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(kernels, args.arch))
    bad = [(k, problems(k)) for k in kernels if problems(k)]
    spills = sum(1 for k in kernels if k.spill_bytes)
    print(f"cuda_resources: {len(kernels)} kernels for sm_{args.arch}, {spills} spill "
          f"({spills - len(bad)} allowed), max {max(k.registers for k in kernels)} registers")
    for k, why in bad:
        print(f"  {short(k.name)}: {why}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
