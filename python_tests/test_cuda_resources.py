"""scripts/cuda_resources.py, the CI check on the CUDA kernels' ptxas -v report: parsing and the spill rule."""
import importlib.util
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "cuda_resources.py"
_spec = importlib.util.spec_from_file_location("cuda_resources", _PATH)
cr = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cr  # its dataclass looks its module up there
_spec.loader.exec_module(cr)

# The shape of ptxas -v's report in a build log: entry functions, the function properties of non-inlined
# device functions in between, and ninja's command lines around them.
LOG = """[2/4] /usr/local/cuda/bin/nvcc ... -c csrc/cuda/q_sample.cu -Xptxas=-v
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN13diffusion_ext7kernelAEv' for 'sm_90'
ptxas info    : Function properties for _ZN13diffusion_ext7kernelAEv
    48 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 48 bytes cumulative stack size
ptxas info    : Function properties for __internal_trig_reduction_slowpathd
    40 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads
ptxas info    : Compiling entry function '_ZN13diffusion_ext7kernelBEv' for 'sm_90'
ptxas info    : Function properties for _ZN13diffusion_ext7kernelBEv
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 8 bytes cumulative stack size, 4096 bytes smem
ptxas info    : Compiling entry function '_ZN13diffusion_ext7kernelAEv' for 'sm_80'
ptxas info    : Function properties for _ZN13diffusion_ext7kernelAEv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
"""


def test_parse_reads_each_entry_per_arch():
    kernels = {(k.name, k.arch): k for k in cr.parse(LOG)}
    a90 = kernels[("diffusion_ext::kernelA()", 90)]
    assert (a90.registers, a90.stack_frame, a90.spill_bytes) == (40, 48, 0)  # the slow path's spills are not A's
    b90 = kernels[("diffusion_ext::kernelB()", 90)]
    assert (b90.registers, b90.spill_bytes, b90.shared) == (255, 12, 4096)
    assert kernels[("diffusion_ext::kernelA()", 80)].registers == 32


def test_spills_fail_unless_allowed(monkeypatch, tmp_path):
    log = tmp_path / "build.log"
    log.write_text(LOG)
    assert cr.main([str(log), "--arch", "80"]) == 0
    assert cr.main([str(log), "--arch", "90"]) == 1
    monkeypatch.setitem(cr.ALLOWED_SPILLS, ("kernelB", 90), (12, "test"))
    assert cr.main([str(log), "--arch", "90", "--markdown", str(tmp_path / "t.md")]) == 0
    assert "kernelB" in (tmp_path / "t.md").read_text()
    monkeypatch.setitem(cr.ALLOWED_SPILLS, ("kernelB", 90), (8, "fewer than it spills"))
    assert cr.main([str(log), "--arch", "90"]) == 1
    monkeypatch.delitem(cr.ALLOWED_SPILLS, ("kernelB", 90))
    monkeypatch.setitem(cr.ALLOWED_SPILLS, (r"kernel[B-Z]\(", 90), (12, "a pattern"))
    assert cr.main([str(log), "--arch", "90"]) == 0
    monkeypatch.delitem(cr.ALLOWED_SPILLS, (r"kernel[B-Z]\(", 90))
    monkeypatch.setitem(cr.ALLOWED_SPILLS, (r"kernel[B-Z]\(", 80), (12, "another arch"))
    assert cr.main([str(log), "--arch", "90"]) == 1


def test_a_log_without_a_report_is_an_error(tmp_path):
    log = tmp_path / "build.log"
    log.write_text("[1/1] c++ -c csrc/checks.cpp\n")
    assert cr.main([str(log), "--arch", "90"]) == 1


@pytest.mark.parametrize("mangled,short", [
    ("void diffusion_ext::(anonymous namespace)::q_sample_kernel<float, int>(float*, int)", "q_sample_kernel<float, int>"),
    ("void diffusion_ext::attn_bwd_simt_kernel<float>(diffusion_ext::BwdParams)", "attn_bwd_simt_kernel<float>"),
])
def test_short_names(mangled, short):
    assert cr.short(mangled) == short
