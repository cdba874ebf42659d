"""`python -m diffusion_ext export --checkpoint CKPT --format diffusers OUT_DIR`: a trained diffusers backbone
as a folder that diffusers alone loads (DDPMPipeline.from_pretrained, DDIMPipeline.from_pretrained).

The folder holds the EMA weights (what the trainer samples with) as a UNet2DModel, and a DDPMScheduler
configured as the training schedule: the same T, β schedule ("cosine" is diffusers' "squaredcos_cap_v2",
both Nichol & Dhariwal 2021 eq. 17 with β ≤ 0.999), β range and prediction type, x̂0 clipped to [−1, 1]
as the trainer's sampler clips pixels, "leading" timestep spacing as its DDIM plan. DDIMPipeline turns it
into a DDIMScheduler with ᾱ_prev = 1 at the end of the chain, as the trainer's DDIM does.
"""
from __future__ import annotations

import os

from diffusers import DDPMPipeline, DDPMScheduler

from ..checkpoint import load_any
from . import diffusers_backbone

FORMATS = ("diffusers",)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def scheduler_for(config: dict) -> DDPMScheduler:
    """The DDPMScheduler of a training config (TrainConfig as a dict)."""
    schedule = config["beta_schedule"]
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"export: beta_schedule {schedule!r} has no diffusers equivalent; expected one of "
                         f"{sorted(BETA_SCHEDULES)}")
    return DDPMScheduler(num_train_timesteps=config["num_timesteps"], beta_start=config["beta_start"],
                         beta_end=config["beta_end"], beta_schedule=BETA_SCHEDULES[schedule],
                         prediction_type=config["prediction_type"], clip_sample=True, clip_sample_range=1.0,
                         variance_type="fixed_small", timestep_spacing="leading")


def _check_out_dir(out_dir: str) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"export: {out_dir} exists and is not a directory; expected a new or empty directory, "
                         f"or one holding an earlier export")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, "model_index.json")):
        raise ValueError(f"export: {out_dir} is not empty and holds no model_index.json (not an earlier export); "
                         f"expected a new or empty directory, so that the pipeline's files are not mixed with others")


def export(checkpoint: str, out_dir: str, fmt: str = "diffusers") -> dict:
    """Writes the EMA model of `checkpoint` (a training checkpoint or exported weights of a run trained with
    --backbone diffusers) and its scheduler to out_dir; returns {"out", "step", "pipeline"}."""
    if fmt not in FORMATS:
        raise ValueError(f"export: format {fmt!r} is unknown; expected one of {FORMATS}")
    info = load_any(checkpoint)
    meta = info["meta"]
    if meta["model_kind"] != diffusers_backbone.KIND:
        raise ValueError(f"export: {checkpoint} holds a {meta['model_kind']!r} model; --format diffusers exports "
                         f"models trained with --backbone diffusers (a {diffusers_backbone.KIND!r} model)")
    _check_out_dir(out_dir)
    model = diffusers_backbone.build(meta["model_config"], fused=False)
    model.load_state_dict(info["weights"])
    pipe = DDPMPipeline(unet=model.unet.eval(), scheduler=scheduler_for(meta["config"]))
    pipe.save_pretrained(out_dir)
    return {"out": out_dir, "step": meta.get("step"), "pipeline": "DDPMPipeline",
            "class_conditional": meta["model_config"].get("num_classes") is not None}
