"""Compile every Triton kernel specialisation the launchers can choose for a GPU, without a GPU, and check
that each fits: python -m diffusion_ext.triton.compile_check --device h200 [--json F] [--markdown F].

The launchers run as they would on the profile's GPU (target.compile_only: its SM count, its tile tables,
no interpreter workarounds) on CPU tensors of the right shapes, dtypes and layouts, and `launch` compiles
each kernel specialisation for the profile's compute capability (Triton front end, LLVM, ptxas) instead of
running it. Each compiled kernel is checked for:
  - registers × threads within one SM's register file (else it cannot launch at all),
  - no register spills (ptxas -v: spill stores/loads of 0 bytes), unless listed in ALLOWED_SPILLS with why,
  - shared memory within the device's per-block limit (Triton allocates it dynamically; the launch, not
    the compile, would fail),
and every @triton.jit kernel of the package must have been compiled at least once (a new kernel the
cases forget fails the check). Exit status 1 on any failure; --json writes every row for the test suite.

What "every specialisation" means here, per op (the cases below say which call reaches which):
  q_sample: each input dtype × table dtype × noise given / made / made per sample × one element per sample
    or many, misaligned pointers, and seed/offset words that Triton would specialise (0, 1, 2^32 + 1, ...),
    which must all reuse one compiled kernel (the words are do_not_specialize).
  reverse steps: DDPM and DDIM × prediction type × variance × guidance × noise none / given / made × dtype ×
    table dtype, and the coefficient pre-pass of each.
  dpmpp_2m_step: DPM-Solver++ × prediction type × guidance × ODE / SDE with noise given or made × first or
    second order (x̂0_last read) × dtype × table dtype, its pre-pass (logarithms in fp64 at second order).
  group_norm_act: dtype × layout (channels-first, channels-last with G = 1 and G > 1) × activation × affine
    or not × FiLM scale/shift or not × fp32 γ, β with half x (mixed precision), at the project's model shapes (UNet and VAE levels, 1×1 and odd
    spatial sizes, latents) so that every tile geometry and the split/combine paths occur, forward and backward.
  dropout: dtype × aligned or misaligned pointers × seed/offset words and thresholds (p = 0, 0.1, 0.5)
    that must all reuse one compiled kernel per dtype.
  attention: dtype × head-dim bucket (16 … 256) at the GPU tile table entry of each kernel (fwd, Δ, dK/dV,
    dQ), head dims that are not powers of two, L = 1 and short L (capped tiles), few heads (the SM-filling
    shrink of the parallel block).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Iterator

import torch

from . import target

# (kernel, substring of the case) -> why a spill there is accepted
_FP64_DKDV = ("fp64 attention is the checking path, not a fast one: at D = 256 (and 200, padded to 256) the dK "
              "and dV accumulators alone are 2×16×256 doubles per program at the smallest tile tl.dot allows "
              "(Triton 3.6: ~0.3 KB spilled with 8 warps)")
ALLOWED_SPILLS: dict[tuple[str, str], str] = {
    ("_attn_bwd_dkdv_kernel", "float64 D=256"): _FP64_DKDV,
    ("_attn_bwd_dkdv_kernel", "float64 D=200"): _FP64_DKDV,
}

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTER_FILE = 65536  # 32-bit registers per SM on sm_80 and sm_90


@dataclasses.dataclass
class Row:
    op: str
    case: str
    kernel: str = ""
    options: str = ""  # constexprs and launch options that name the specialisation
    num_warps: int = 0
    num_stages: int = 0
    registers: int = 0
    spill_bytes: int = 0
    stack_frame: int = 0
    shared: int = 0
    mma: str = ""
    hash: str = ""
    error: str = ""  # compile error, or a resource check that failed


@dataclasses.dataclass
class Case:
    op: str
    name: str
    run: Callable[[], object]


def _mod(name: str):
    # diffusion_ext.triton re-exports the ops under their module names (q_sample the op shadows q_sample
    # the module), so the launch modules are reached through sys.modules
    return importlib.import_module(f"diffusion_ext.triton.{name}")


def _empty(shape, dtype, layout="contiguous", misalign=False):
    """An uninitialised CPU tensor of that shape, dtype and layout (nothing runs: values do not matter)."""
    if misalign:  # storage offset of one element: pointers not 16-byte aligned
        return torch.empty(int(torch.tensor(shape).prod()) + 1, dtype=dtype)[1:].view(shape)
    if layout == "channels_last":
        return torch.empty(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return torch.empty(shape, dtype=dtype)


DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SEEDS = ((0, 0), (1, 1), (2**32 + 1, 2**32 + 1), (-1, 2**63 - 1), (16, 2**31), (2**31, 16))


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------------
def _schedule_cases(reduced: bool = False) -> Iterator[Case]:
    qs, rs = _mod("q_sample"), _mod("reverse_step")
    seeds_all = SEEDS[:1] if reduced else SEEDS
    for dtype in (torch.bfloat16, torch.float64) if reduced else DTYPES:
        for tdtype in (torch.float32, torch.float64):
            table = torch.linspace(0.9999, 0.01, 1000, dtype=tdtype)
            for shape, misalign in (((4, 3, 8, 8), False), ((1,), False), ((5, 7), True)):
                B = shape[0]
                t = torch.arange(B) * 37 % 1000
                sname = "x".join(map(str, shape)) + (" misaligned" if misalign else "")
                x = _empty(shape, dtype, misalign=misalign)
                base = f"{_name(dtype)} x {sname}, {_name(tdtype)} table"
                yield Case("q_sample", f"noise given, {base}",
                           lambda x=x, t=t, table=table: qs.launch_q_sample(x, t, torch.empty_like(x), table))
                for streams in (False, True):
                    for seed, offset in seeds_all:
                        yield Case("q_sample", f"noise made{' per sample' if streams else ''}, seed {seed}, "
                                               f"offset {offset}, {base}",
                                   lambda x=x, t=t, table=table, seed=seed, offset=offset, streams=streams:
                                   qs.launch_q_sample(x, t, None, table, seed, offset, make_noise=True,
                                                      per_sample_streams=streams))
                if shape != (4, 3, 8, 8):
                    continue
                m = torch.empty_like(x)
                for prediction in ("epsilon", "sample", "v_prediction"):
                    for guided in (False, True):
                        mu = torch.empty_like(x) if guided else None
                        w = 3.0 if guided else None
                        for variance in ("fixed_small", "fixed_large"):
                            for noise in (torch.empty_like(x), None):
                                seeds = seeds_all if noise is None and variance == "fixed_small" else SEEDS[:1]
                                for seed, offset in seeds:
                                    yield Case("ddpm_step", f"{prediction}, {variance}, guided={guided}, noise "
                                                            f"{'given' if noise is not None else 'made'}, seed {seed}, "
                                                            f"offset {offset}, {base}",
                                               lambda m=m, t=t, x=x, table=table, noise=noise, seed=seed,
                                               offset=offset, variance=variance, prediction=prediction, w=w,
                                               mu=mu: rs.ddpm_step(m, t, x, table, noise, seed, offset, True, 1.0,
                                                                   variance, prediction, w, mu))
                        for eta, noise in ((0.0, None), (0.5, torch.empty_like(x)), (1.0, None)):
                            yield Case("ddim_step", f"{prediction}, eta={eta}, guided={guided}, noise "
                                                    f"{'given' if noise is not None else 'made'}, {base}",
                                       lambda m=m, t=t, x=x, table=table, noise=noise, eta=eta,
                                       prediction=prediction, w=w, mu=mu:
                                       rs.ddim_step(m, t, (t - 20).clamp(min=-1), x, table, eta, noise, 7, 1, False,
                                                    1.0, prediction, w, mu))


def _dpm_solver_cases(reduced: bool = False) -> Iterator[Case]:
    rs = _mod("reverse_step")
    seeds_all = SEEDS[:1] if reduced else SEEDS
    for dtype in (torch.bfloat16, torch.float64) if reduced else DTYPES:
        for tdtype in (torch.float32, torch.float64):
            table = torch.linspace(0.9999, 0.01, 1000, dtype=tdtype)
            # the prediction type only reaches the pre-pass (one per accumulation dtype); misaligned pointers
            # only the element-wise kernel's vector width (one dtype)
            shapes = (((4, 3, 8, 8), False), ((5, 7), True)) if dtype == torch.bfloat16 else (((4, 3, 8, 8), False),)
            for shape, misalign in shapes:
                B = shape[0]
                t = 100 + torch.arange(B) * 37
                t_prev, t_last = (t - 20).clamp(min=-1), t + 20
                x = _empty(shape, dtype, misalign=misalign)
                m = torch.empty_like(x)
                base = f"{_name(dtype)} x {'x'.join(map(str, shape))}{' misaligned' if misalign else ''}, " \
                       f"{_name(tdtype)} table"
                full = dtype in (torch.float32, torch.float64) and not misalign
                for prediction in ("epsilon", "sample", "v_prediction") if full else ("epsilon",):
                    for guided in (False, True):
                        mu, w = (torch.empty_like(x), 3.0) if guided else (None, None)
                        for order in (1, 2):
                            last, tl = (torch.empty_like(x), t_last) if order == 2 else (None, None)
                            for sde, noise in ((False, None), (True, torch.empty_like(x)), (True, None)):
                                seeds = seeds_all if sde and noise is None and order == 2 else SEEDS[:1]
                                for seed, offset in seeds:
                                    what = "ode" if not sde else f"sde, noise {'given' if noise is not None else 'made'}"
                                    yield Case("dpmpp_2m_step", f"dpmpp {prediction}, order {order}, {what}, "
                                                                f"guided={guided}, seed {seed}, offset {offset}, {base}",
                                               lambda m=m, t=t, t_prev=t_prev, x=x, table=table, last=last, tl=tl,
                                               sde=sde, noise=noise, seed=seed, offset=offset, prediction=prediction,
                                               w=w, mu=mu: rs.dpmpp_2m_step(m, t, t_prev, x, table, last, tl, sde,
                                                                            noise, seed, offset, True, 1.0,
                                                                            prediction, w, mu))


# (N, C, H, W) that reach every tile geometry of the group-norm kernels: the spatial sizes of the project's
# models (UNet 64×64 with base 64 and mults 1,2,2,2: 64², 32², 16², 8²; the VAE down to 4²; 1×1) fix
# BLOCK_S in channels-first, the channel counts (4: latents, 32, 64, ≥ 128) fix BLOCK_C in channels-last,
# and one large group with few programs takes the split/combine path of the statistics.
GN_GEOMETRY = ((8, 64, 64, 64), (8, 256, 16, 16), (1, 512, 4, 4), (2, 32, 1, 1), (4, 4, 8, 8), (1, 64, 128, 128))
GN_DTYPE_SHAPES = ((8, 128, 32, 32),)  # the other dtypes: a common geometry
# each activation and each (weight, bias) presence at least once
GN_FLAGS = (("silu", True, True), ("relu", True, True), ("none", True, True), ("silu", False, False),
            ("silu", True, False), ("relu", False, True))
# FiLM (scale, shift) presence: both (AdaGN), and each alone
GN_FILM = ((True, True), (True, False), (False, True))


def _group_norm_cases(reduced: bool = False) -> Iterator[Case]:
    gn = _mod("group_norm_act")

    def case(dtype, layout, shape, G, act="silu", has_w=True, has_b=True, film=(False, False), param_dtype=None):
        N, C = shape[:2]
        x = _empty(shape, dtype, layout)
        w = torch.empty(C, dtype=param_dtype or dtype) if has_w else None
        b = torch.empty(C, dtype=param_dtype or dtype) if has_b else None
        # FiLM as diffusers' ResnetBlock2D makes it: scale and shift halves of one (N, 2C) projection
        st = torch.empty(N, 2 * C, dtype=dtype)
        s, t = (half if on else None for half, on in zip(st.chunk(2, dim=1), film))

        def fwd_bwd():
            y, mean, rstd = gn.launch_group_norm_act(x, G, w, b, 1e-5, act, s, t)
            gn.launch_group_norm_act_backward(torch.empty_like(y), x, mean, rstd, w, b, G, act,
                                              [True, w is not None, b is not None], s, t)

        film_name = {(False, False): "", (True, True): ", FiLM scale+shift", (True, False): ", FiLM scale",
                     (False, True): ", FiLM shift"}[tuple(film)]
        mixed = f", {_name(param_dtype)} weight, bias" if param_dtype else ""
        return Case("group_norm_act", f"{_name(dtype)} {layout} {'x'.join(map(str, shape))}, G={G}, {act}, "
                                      f"weight={has_w}, bias={has_b}{film_name}{mixed}", fwd_bwd)

    layouts = ("contiguous", "channels_last")
    groups = lambda C: sorted({1, min(32, C)})  # noqa: E731  (one group: a layout branch of its own)
    # the activation and affine flags, in each layout
    for (dtype, layout) in ((torch.float32, "contiguous"), (torch.bfloat16, "channels_last")):
        for flags in GN_FLAGS:
            yield case(dtype, layout, (8, 128, 32, 32), 32, *flags)
        for film in GN_FILM:
            for has_w in (True, False):  # with γ the backward folds (1 + s) into the ∂γ, ∂β sums
                yield case(dtype, layout, (8, 128, 32, 32), 32, "silu", has_w, has_w, film)
    # mixed precision: fp32 γ, β (and fp32 ∂γ, ∂β) with half activations, as autocast models hold them
    yield case(torch.bfloat16, "channels_last", (8, 128, 32, 32), 32, film=(True, True), param_dtype=torch.float32)
    if reduced:
        return
    # every tile geometry, in fp32
    for layout in layouts:
        for shape in GN_GEOMETRY:
            for G in groups(shape[1]):
                yield case(torch.float32, layout, shape, G)
    # every other dtype
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        for layout in layouts:
            for shape in GN_DTYPE_SHAPES:
                for G in groups(shape[1]):
                    yield case(dtype, layout, shape, G)
                    yield case(dtype, layout, shape, G, film=(True, True))
                    if dtype != torch.float64:
                        yield case(dtype, layout, shape, G, param_dtype=torch.float32)


# head dims: every bucket at its power of two (tile table entries) and in-bucket values that are not
ATTN_HEAD_DIMS = (16, 32, 64, 128, 256)
ATTN_ODD_HEAD_DIMS = (8, 40, 80, 200)


def _attention_cases(reduced: bool = False) -> Iterator[Case]:
    at = _mod("attention")

    def case(dtype, D, Lq, Lk, BH, what):
        B, H = (BH, 1) if BH < 8 else (BH // 8, 8)
        q = _empty((B, H, Lq, D), dtype)
        k, v = _empty((B, H, Lk, D), dtype), _empty((B, H, Lk, D), dtype)

        def fwd_bwd():
            out, lse = at.launch_attention(q, k, v, D ** -0.5)
            at.launch_attention_backward(torch.empty_like(out), q, k, v, out, lse, D ** -0.5)

        return Case("attention", f"{_name(dtype)} D={D} Lq={Lq} Lk={Lk} B·H={BH}: {what}", fwd_bwd)

    # the tile table entry of every kernel for every dtype and head-dim bucket (where registers and shared
    # memory run out first)
    for dtype in DTYPES:
        for D in ATTN_HEAD_DIMS:
            yield case(dtype, D, 1024, 1024, 128, "tile table")
    if reduced:
        return
    for dtype in (torch.bfloat16, torch.float32):
        for D in ATTN_ODD_HEAD_DIMS:
            yield case(dtype, D, 1024, 1024, 128, "head dim not a power of two")
        yield case(dtype, 64, 1, 1, 4, "L = 1")
        yield case(dtype, 64, 77, 256, 32, "short L, Lq ≠ Lk")
        yield case(dtype, 64, 4096, 7, 2, "long Lq, short Lk")
        for D in (64, 128):
            for BH in (9, 1):  # SM-filling shrink of the parallel block: to 64, to 32
                yield case(dtype, D, 1024, 1024, BH, "few heads")
    # fp64's largest odd head dim: the most registers of its bucket (the Δ kernel spilled there at 64 rows)
    yield case(torch.float64, ATTN_ODD_HEAD_DIMS[-1], 1024, 1024, 128, "head dim not a power of two")


def _dropout_cases(reduced: bool = False) -> Iterator[Case]:
    dr = _mod("dropout")
    for dtype in (torch.bfloat16, torch.float64) if reduced else DTYPES:
        for shape, misalign in (((4, 3, 8, 8), False), ((5, 7), True)):
            x = _empty(shape, dtype, misalign=misalign)
            sname = "x".join(map(str, shape)) + (" misaligned" if misalign else "")
            for p in (0.0, 0.1, 0.5):
                for seed, offset in SEEDS[:1] if reduced else SEEDS:
                    yield Case("dropout", f"{_name(dtype)} x {sname}, p {p}, seed {seed}, offset {offset}",
                               lambda x=x, p=p, seed=seed, offset=offset: dr.launch_dropout(x, p, seed, offset))


CASES = {"q_sample": _schedule_cases, "dpmpp_2m_step": _dpm_solver_cases, "group_norm_act": _group_norm_cases,
         "attention": _attention_cases, "dropout": _dropout_cases}
# seconds each op's full check took alone (Triton 3.9, sm_90, the project's CPU, one core): how --jobs splits
OP_SECONDS = {"attention": 151, "group_norm_act": 101, "q_sample": 45, "dpmpp_2m_step": 38, "dropout": 3}


# ------------------------------------------------------------------------------------------------------
# running and checking
# ------------------------------------------------------------------------------------------------------
def _mma_kind(ptx: str) -> str:
    if "wgmma" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return ""


def _options(kwargs: dict) -> str:
    shown = []
    for k, v in kwargs.items():
        if k in ("num_warps", "num_stages"):
            continue
        shown.append(f"{k}={getattr(v, '__name__', None) or str(v).removeprefix('triton.language.')}")
    return " ".join(shown)


def _row(op: str, case: str, c: target.Compiled, device: target.DeviceProfile) -> Row:
    md = c.compiled.metadata
    regs = _PTXAS_REGS.search(c.ptxas_log)
    spill = _PTXAS_SPILL.search(c.ptxas_log)
    row = Row(op, case, c.kernel, _options(c.constexprs), md.num_warps, md.num_stages,
              int(regs.group(1)) if regs else -1,
              int(spill.group(2)) + int(spill.group(3)) if spill else -1,
              int(spill.group(1)) if spill else -1, md.shared, _mma_kind(c.compiled.asm.get("ptx", "")), md.hash)
    problems = []
    if row.registers < 0 or row.spill_bytes < 0:
        problems.append("no ptxas -v report (registers/spills unknown)")
    if row.registers * 32 * row.num_warps > REGISTER_FILE:
        problems.append(f"{row.registers} registers × {32 * row.num_warps} threads exceed the register file")
    if row.spill_bytes > 0 and not any(k == c.kernel and s in case for (k, s) in ALLOWED_SPILLS):
        problems.append(f"{row.spill_bytes} bytes of register spills")
    if row.shared > device.max_shared_memory:
        problems.append(f"{row.shared} bytes of shared memory > the {device.max_shared_memory} one block may use")
    row.error = "; ".join(problems)
    return row


def jit_kernels() -> set[str]:
    """Names of every launchable @triton.jit function in the package's modules (by convention, *_kernel),
    a new op file included."""
    import pkgutil

    from .. import triton as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        for name, obj in vars(_mod(info.name)).items():
            if name.endswith("_kernel") and hasattr(obj, "fn"):
                names.add(name)
    return names


def check(device: target.DeviceProfile, ops=None, log=None, reduced: bool = False, match: str = "") -> list[Row]:
    rows: list[Row] = []
    seen: set[str] = set()
    with target.compile_only(device) as compiled:
        for op, gen in CASES.items():
            if ops and op not in ops:
                continue
            for case in gen(reduced):
                if match and match not in case.name:
                    continue
                n0 = len(compiled)
                t0 = time.time()
                try:
                    case.run()
                except Exception as e:  # a compile error is a failing row, and the check goes on
                    msg = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
                    cause = e.__cause__ or e.__context__
                    detail = f" (caused by {type(cause).__name__}: {cause})" if cause is not None else ""
                    rows.append(Row(case.op, case.name, error=f"{' '.join(msg)[-600:]}{detail}"[:900]))
                for c in compiled[n0:]:
                    key = c.compiled.metadata.hash
                    if key in seen:
                        continue
                    seen.add(key)
                    rows.append(_row(case.op, case.name, c, device))
                if log is not None and len(compiled) > n0:
                    print(f"{time.time() - t0:6.1f} s  {case.op}: {case.name}", file=log, flush=True)
    if not ops and not reduced and not match:
        rows += _missing_kernel_rows(rows)
    return rows


def _missing_kernel_rows(rows: list[Row]) -> list[Row]:
    missing = jit_kernels() - {r.kernel for r in rows}
    return [Row("?", "no case compiles it", name, error="kernel never compiled by the cases") for name in sorted(missing)]


def split_ops(ops: list[str], jobs: int) -> list[list[str]]:
    """ops in at most `jobs` groups of about equal compile time (longest first, each to the lightest group)."""
    groups: list[list[str]] = [[] for _ in range(min(jobs, len(ops)))]
    load = [0.0] * len(groups)
    for op in sorted(ops, key=lambda o: -OP_SECONDS.get(o, 60)):
        i = load.index(min(load))
        groups[i].append(op)
        load[i] += OP_SECONDS.get(op, 60)
    return [sorted(g, key=list(CASES).index) for g in groups]


def check_in_parallel(device_key: str, jobs: int, ops=None, reduced: bool = False, match: str = "") -> list[Row]:
    """check() with the ops split over `jobs` processes: Triton compiles on one core, and a GPU target's full set
    is minutes of it. The rows are one process's rows, grouped by process: a kernel that two groups compile (a
    shared pre-pass) is listed once, and the missing-kernel rows are added over all of them."""
    selected = [op for op in CASES if not ops or op in ops]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile-only needs the real kernels
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, group in enumerate(split_ops(selected, jobs)):
            out = os.path.join(tmp, f"{i}.json")
            cmd = [sys.executable, "-m", "diffusion_ext.triton.compile_check", "--device", device_key, "--quiet",
                   "--json", out, "--ops", *group, *(["--reduced"] if reduced else []), *(["--match", match] if match else [])]
            procs.append((group, out, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                       text=True)))
        rows: list[Row] = []
        seen: set[str] = set()
        for group, out, p in procs:
            log = p.communicate()[0]
            if not os.path.exists(out):
                raise RuntimeError(f"compile_check --ops {' '.join(group)} wrote no results (exit {p.returncode}):\n"
                                   f"{log[-3000:]}")
            with open(out) as f:
                for row in (Row(**r) for r in json.load(f)):
                    if not (row.hash and row.hash in seen):
                        seen.add(row.hash)
                        rows.append(row)
    if not ops and not reduced and not match:
        rows += _missing_kernel_rows(rows)
    return rows


def markdown(rows: list[Row], device: target.DeviceProfile, seconds: float) -> str:
    import triton

    lines = [f"# Triton kernels compiled for {device.name} (sm_{device.arch}) without a GPU", "",
             f"`python -m diffusion_ext.triton.compile_check --device {_profile_key(device)} --markdown FILE`, "
             f"Triton {triton.__version__}, torch {torch.__version__}; {len(rows)} distinct specialisations in "
             f"{seconds:.0f} s. Each row is one compiled kernel (the first case that reached it); registers and "
             f"spills from ptxas -v, shared memory as Triton allocates it (limit {device.max_shared_memory} "
             "bytes per block), mma: the matrix instruction in the PTX (empty: none, e.g. fp32/fp64 FMA dots).",
             "", "| op | kernel | case | options | warps | stages | regs | spills B | stack B | smem B | mma | "
                 "problem |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.op} | {r.kernel} | {r.case} | {r.options} | {r.num_warps} | {r.num_stages} | "
                     f"{r.registers} | {r.spill_bytes} | {r.stack_frame} | {r.shared} | {r.mma} | "
                     f"{r.error.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _profile_key(device: target.DeviceProfile) -> str:
    return next(k for k, v in target.PROFILES.items() if v == device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusion_ext.triton.compile_check", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=sorted(target.PROFILES), default="h200")
    p.add_argument("--ops", nargs="*", choices=sorted(CASES), help="only these ops (default: all)")
    p.add_argument("--json", help="write every row here")
    p.add_argument("--markdown", help="write the resource table here")
    p.add_argument("--quiet", action="store_true", help="no per-case progress lines")
    p.add_argument("--match", default="", help="only the cases whose name holds this text (for a quick look)")
    p.add_argument("--reduced", action="store_true",
                   help="a second target's check: every kernel at its tile-table entries and flags, each dtype once "
                        "(not every geometry, odd head dim and seed value)")
    p.add_argument("--jobs", type=int, default=1,
                   help="split the ops over this many processes (one core each; no per-case progress lines)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: expected a positive number of processes")
    device = target.PROFILES[args.device]
    t0 = time.time()
    if args.jobs > 1:
        rows = check_in_parallel(args.device, args.jobs, args.ops, reduced=args.reduced, match=args.match)
    else:
        rows = check(device, args.ops, log=None if args.quiet else sys.stderr, reduced=args.reduced, match=args.match)
    seconds = time.time() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, device, seconds))
    bad = [r for r in rows if r.error]
    print(f"{len(rows)} kernel specialisations compiled for sm_{device.arch} in {seconds:.0f} s; "
          f"{len(bad)} with problems")
    for r in bad:
        print(f"  {r.kernel or '?'} [{r.op}: {r.case}]: {r.error}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
