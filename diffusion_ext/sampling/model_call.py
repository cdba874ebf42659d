"""Calling the denoiser, the one place that knows how: a model(x, t) or model(x, t, y), the conditioning
image concatenated on channels, and under classifier-free guidance the conditional and the unconditional
prediction from a single call on the doubled batch [x; x] with labels [y; ∅] (Ho & Salimans 2022, eq. 6).
Training (Diffusion.loss_at) and every sampler call it the same way.
"""
from __future__ import annotations

import torch


def call_model(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """model(x, t) or model(x, t, y): a plain callable model(x, t) works too (unconditional models, tests)."""
    return model(x, t) if y is None else model(x, t, y)


def null_class(model, who: str) -> int:
    """The label of the null class ∅ (index num_classes), or a ValueError naming `who`."""
    n = getattr(model, "num_classes", None)
    if n is None:
        raise ValueError(f"{who}: classifier-free guidance and label dropping need a class-conditional model "
                         f"(num_classes set; its index num_classes is the null class), but the model has none")
    return n


def with_condition(x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """The model's input: x, with the conditioning image (depth prediction's RGB) on channels."""
    return x if cond is None else torch.cat([x, cond.to(x.dtype)], dim=1)


def predict(model, x: torch.Tensor, t: torch.Tensor, *, y: torch.Tensor | None = None,
            cond: torch.Tensor | None = None,
            guidance_scale: float | None = None, who: str = "Diffusion.sample") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the model's output, the unconditional output or None) at x_t, in x's dtype (under autocast the model
    answers in bf16/fp16; the chain stays in x's dtype). The fused steps combine the two themselves."""
    inp = with_condition(x, cond)
    uncond = None
    if guidance_scale is not None:
        null = torch.full_like(y, null_class(model, who))
        out, uncond = call_model(model, torch.cat([inp, inp]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    else:
        out = call_model(model, inp, t, y)
    return out.to(x.dtype), None if uncond is None else uncond.to(x.dtype)


class eval_mode:
    """Puts an nn.Module in eval mode (no dropout) for the duration, then restores its mode."""

    def __init__(self, model):
        self.model = model if isinstance(model, torch.nn.Module) else None

    def __enter__(self):
        if self.model is not None:
            self.training = self.model.training
            self.model.eval()

    def __exit__(self, *exc):
        if self.model is not None:
            self.model.train(self.training)
