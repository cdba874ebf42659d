"""EMA: an exponential moving average of a model's weights, the weights that sampling uses.

After update n (1-based), with the warm-up of TensorFlow's ExponentialMovingAverage(num_updates=...) and
diffusers' EMAModel (use_ema_warmup=False):

    d_n = min(decay, (1 + n) / (10 + n))            (d_n = decay without warm-up)
    θ_ema ← d_n · θ_ema + (1 − d_n) · θ

so the average forgets its random initialisation after a few updates instead of ~1/(1 − decay) of them
(with decay = 0.9999 a plain EMA still weighs the initial weights by e^-1 after 10 000 steps). Buffers
(none in our models today) are copied, not averaged. The shadow weights live in a full copy of the model
(`ema.module`), so sampling calls it like the model itself.
"""
from __future__ import annotations

import copy

import torch


def ema_decay(decay: float, num_updates: int, warmup: bool = True) -> float:
    """The decay used by update number `num_updates` (1-based)."""
    if not warmup:
        return decay
    return min(decay, (1 + num_updates) / (10 + num_updates))


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay = {decay}; expected 0 <= decay < 1")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> float:
        """One EMA step towards `model` (the bare model, not a DDP or compiled wrapper); returns d_n."""
        self.num_updates += 1
        d = ema_decay(self.decay, self.num_updates, self.warmup)
        ema_p = list(self.module.parameters())
        src_p = [p.detach() for p in model.parameters()]
        if len(ema_p) != len(src_p):
            raise ValueError("EMA.update: the model has a different number of parameters than the EMA copy")
        # θ_ema + (1 − d)(θ − θ_ema) = d·θ_ema + (1 − d)·θ, in one foreach pass
        torch._foreach_lerp_(ema_p, [p.to(e.dtype) for p, e in zip(src_p, ema_p)], 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
        return d

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.warmup = float(state["decay"]), bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["module"])
