"""Integrations: one module per third-party library whose models diffusion_ext accelerates.

Each exposes `patch(obj) -> report` and `unpatch(obj)` and imports its library only when imported itself,
so `import diffusion_ext` never needs them:

    from diffusion_ext.integrations import diffusers as dxd   # needs `pip install diffusion_ext[diffusers]`
"""
