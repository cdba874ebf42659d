"""Every Triton kernel specialisation the launchers can choose compiles for Hopper (sm_90) without a GPU, and
fits: no register spills, shared memory within the block limit, registers within the SM's file
(diffusion_ext/triton/compile_check.py says how and what "every" covers); for Ampere (sm_80) the reduced
set: every kernel at its tile-table entries and flags, each dtype once.

The check runs in subprocesses: Triton's interpreter (which this test session uses for CPU tensors)
replaces the @triton.jit kernels at import, and compile-only needs the real ones. The runs go side
by side, in the background from the end of collection (compile_check_jobs.py). What the interpreter accepts but a GPU compiler rejects fails here, on the CPU: annotated
constexpr globals, `.to()` on an integer argument that Triton specialised to the constant 1 (a seed or
offset word equal to 1), tl.dot into an fp64 accumulator without out_dtype.
"""
import compile_check_jobs
import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.slow
TARGETS = compile_check_jobs.TARGETS


@pytest.fixture(scope="module")
def results():
    """({device: rows}, {device: log}) of the compile_check runs the session started in the background after
    collection (python_tests/compile_check_jobs.py), waited for here."""
    return compile_check_jobs.results()


@pytest.mark.parametrize("device", TARGETS)
def test_every_specialisation_compiles_and_fits(results, device):
    rows, logs = results
    bad = [f"{r['kernel'] or '?'} [{r['op']}: {r['case']}]: {r['error']}" for r in rows[device] if r["error"]]
    assert not bad, f"{len(bad)} of {len(rows[device])} kernel specialisations fail for {device}:\n" + "\n".join(bad[:30])
    assert len(rows[device]) > 50, logs[device][-2000:]


def test_every_kernel_is_compiled(results):
    from diffusion_ext.triton.compile_check import jit_kernels  # imports triton modules, not their kernels' code

    compiled = {r["kernel"] for r in results[0]["h200"] if not r["error"]}
    assert jit_kernels() <= compiled, f"never compiled for sm_90: {sorted(jit_kernels() - compiled)}"


def test_seed_and_offset_words_never_make_a_new_kernel(results):
    """The noise kernels take the Philox seed/offset as four int32 words that are do_not_specialize: the
    cases that only change the seed or offset (1, 2^32 + 1, −1, 2^63 − 1, ...) reuse the kernel compiled
    for seed 0, so no seed recompiles at run time, and a word equal to 1 is never a constant."""
    rows = results[0]["h200"]
    noise_cases = [r for r in rows if "seed" in r["case"] and r["kernel"] != "_schedule_coef_kernel"]
    assert noise_cases, "no noise-making case compiled"
    new_for_seed = [r["case"] for r in noise_cases if "seed 0, offset 0" not in r["case"]]
    assert not new_for_seed, f"seed/offset values that compiled a kernel of their own: {new_for_seed[:10]}"


def test_fp16_attention_uses_tensor_cores(results):
    """On sm_90 the 16-bit attention dots are tensor-core instructions (wgmma or mma.sync), not FMA."""
    rows = [r for r in results[0]["h200"] if r["op"] == "attention" and r["case"].startswith(("float16", "bfloat16"))
            and r["kernel"] != "_attn_bwd_delta_kernel" and "tile table" in r["case"]]
    assert rows and all(r["mma"] for r in rows), [(r["kernel"], r["case"]) for r in rows if not r["mma"]]


@pytest.mark.parametrize("jobs", [1, 2, 3, 7])
def test_split_ops_puts_every_op_in_exactly_one_group(jobs):
    from diffusion_ext.triton.compile_check import CASES, OP_SECONDS, split_ops

    groups = split_ops(list(CASES), jobs)
    assert sorted(op for g in groups for op in g) == sorted(CASES)
    assert len(groups) == min(jobs, len(CASES)) and all(groups)
    if jobs == 2:  # the longest op alone on one side, the rest within its time of it
        loads = sorted(sum(OP_SECONDS[o] for o in g) for g in groups)
        assert loads[1] - loads[0] <= max(OP_SECONDS.values())
