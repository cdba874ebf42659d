"""Loads the compiled extension and refuses one built for another torch.

An extension must run with the torch it was compiled against (the C++ ABI of libtorch changes between
releases). _C records that version; a mismatch, or a _C that does not load at all, raises an ImportError
that says how to rebuild.
"""
import torch

_REBUILD = "rebuild it against the installed torch with: pip install --no-build-isolation ."

try:
    from . import _C
except ImportError as e:  # e.g. undefined symbols from a different libtorch
    raise ImportError(
        f"diffusion_ext: the compiled extension diffusion_ext._C failed to load ({e}); "
        f"torch is {torch.__version__}; {_REBUILD}"
    ) from e

_built_for = _C.build_info()["torch_version"]
if _built_for.split("+")[0] != torch.__version__.split("+")[0]:
    raise ImportError(
        f"diffusion_ext: _C was built against torch {_built_for} but torch {torch.__version__} is installed; "
        f"{_REBUILD}"
    )


def build_info() -> dict:
    """What this build holds: backends compiled ('cpu', 'cuda'), CUDA version and archs, OpenMP, the torch
    version it was built against, and whether Triton is importable."""
    info = dict(_C.build_info())
    try:
        import triton

        info["triton_version"] = triton.__version__
    except ImportError:
        info["triton_version"] = None
    return info
