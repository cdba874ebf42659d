"""Triton kernels of the diffusion_ext ops, one file per op, registered as diffusion_ext_triton::* custom
ops so that torch.compile treats them as opaque calls. Imported lazily by diffusion_ext.ops when the
"triton" backend is chosen: a machine without Triton never imports this package.
"""
from .q_sample import q_sample, q_sample_with_noise  # noqa: F401
from .reverse_step import ddim_step, ddpm_step, dpmpp_2m_step  # noqa: F401
from .group_norm_act import group_norm_act, group_norm_act_backward  # noqa: F401
from .attention import attention, attention_backward  # noqa: F401
from .dropout import dropout  # noqa: F401
