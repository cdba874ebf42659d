"""The package around the kernels: build information, the torch-version guard, backend choice."""
import importlib
import os
import subprocess
import sys

import pytest
import torch

import diffusion_ext as dx
from diffusion_ext import backend


def test_build_info():
    info = dx.build_info()
    assert "cpu" in info["backends"]
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["openmp"], bool)
    if "cuda" in info["backends"]:
        assert info["cuda_version"] and info["cuda_archs"]
    else:
        assert info["cuda_version"] is None


def test_ops_are_registered_with_the_dispatcher():
    for name in ("q_sample", "q_sample_with_noise", "ddpm_step", "ddim_step", "group_norm_act", "group_norm_act_backward",
                 "attention", "attention_backward"):
        op = getattr(torch.ops.diffusion_ext, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")


def test_torch_version_mismatch_is_a_clear_import_error(monkeypatch):
    import diffusion_ext._loader as loader

    monkeypatch.setattr(torch, "__version__", "1.0.0")
    with pytest.raises(ImportError, match=r"built against torch .* but torch 1\.0\.0 is installed.*"
                                          r"pip install --no-build-isolation"):
        importlib.reload(loader)
    monkeypatch.undo()
    importlib.reload(loader)


def test_use_backend_nests_and_restores():
    assert backend.requested() in backend.BACKENDS
    with dx.use_backend("torch"):
        assert backend.resolve("q_sample", torch.device("cpu")) == "torch"
        with dx.use_backend("cpu"):
            assert backend.resolve("q_sample", torch.device("cpu")) == "cpu"
        assert backend.resolve("q_sample", torch.device("cpu")) == "torch"


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("DIFFUSION_EXT_BACKEND", "torch")
    assert backend.resolve("ddpm_step", torch.device("cpu")) == "torch"
    monkeypatch.setenv("DIFFUSION_EXT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DIFFUSION_EXT_BACKEND|unknown"):
        backend.resolve("ddpm_step", torch.device("cpu"))


def test_auto_is_the_cpu_kernel_for_cpu_tensors():
    with dx.use_backend("auto"):
        assert backend.resolve("q_sample", torch.device("cpu")) == "cpu"


def test_import_without_triton_installed(tmp_path):
    # A stub that makes `import triton` fail, first on the path: diffusion_ext must import, run its CPU
    # ops, and say how to get Triton when it is asked for.
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('no triton here')\n")
    code = (
        "import torch, diffusion_ext as dx\n"
        "x = torch.zeros(2, 3); t = torch.tensor([0, 1])\n"
        "print(dx.NoiseSchedule(10).q_sample(x, t, x).shape)\n"
        "assert 'triton' not in dx.available_backends('cpu')\n"
        "with dx.use_backend('triton'):\n"
        "    try:\n"
        "        dx.NoiseSchedule(10).q_sample(x, t, x)\n"
        "    except dx.BackendUnavailable as e:\n"
        "        print('unavailable:', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "unavailable:" in out.stdout and "pip install triton" in out.stdout
