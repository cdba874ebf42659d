"""A diffusers UNet2DModel as the trainer's denoiser (`train --backbone diffusers`).

unet2d_config maps the trainer's U-Net options onto UNet2DModel's: one down block per level of
channel_mults (AttnDownBlock2D where the level's resolution is in attention_resolutions, else
DownBlock2D), the up blocks mirrored, num_res_blocks resnets per block (diffusers' decoder adds one, as
ours does), a mid-block with attention, head_dim channels per head. DiffusersUNet wraps the model in the
call the trainer and samplers make, model(x, t[, y]) -> ε̂, and patches it onto the fused kernels
(fused=True) or leaves diffusers' code (fused=False, the baseline). Its state_dict is the UNet2DModel's
under "unet.", so export (diffusers_export.py) hands diffusers exactly the weights trained here.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DModel

from . import diffusers as dxd

KIND = "diffusers-unet2d"


def unet2d_config(*, image_size: int, in_channels: int, out_channels: int, base_channels: int, channel_mults,
                  num_res_blocks: int, attention_resolutions, dropout: float, head_dim: int | None, num_groups: int,
                  num_classes: int | None = None) -> dict:
    """UNet2DModel's keyword arguments (JSON types) for the trainer's U-Net options."""
    mults = list(channel_mults)
    resolutions = [image_size // 2 ** i for i in range(len(mults))]
    attn = set(attention_resolutions)
    down = ["AttnDownBlock2D" if r in attn else "DownBlock2D" for r in resolutions]
    up = ["AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(resolutions)]
    return dict(sample_size=image_size, in_channels=in_channels, out_channels=out_channels,
                block_out_channels=[base_channels * m for m in mults], layers_per_block=num_res_blocks,
                down_block_types=down, up_block_types=up, dropout=float(dropout),
                attention_head_dim=head_dim, norm_num_groups=num_groups,
                # one row more than the labels: the last is the null class of classifier-free guidance
                num_class_embeds=None if num_classes is None else num_classes + 1)


# The report's 64×64 pixel model (bench_unet.py's CONFIG) as a UNet2DModel: attention at 16×16 and in the
# mid-block, 2 resnets per level, 32 groups, head dim 32.
REPORT_64 = unet2d_config(image_size=64, in_channels=3, out_channels=3, base_channels=64, channel_mults=(1, 2, 2, 2),
                          num_res_blocks=2, attention_resolutions=(16,), dropout=0.1, head_dim=32, num_groups=32)


def spec_from_unet(spec: dict) -> tuple[str, dict]:
    """(KIND, model config) of the UNet2DModel with the options of a native UNet config (train.model_spec)."""
    return KIND, {"unet": unet2d_config(**spec), "num_classes": spec["num_classes"]}


class DiffusersUNet(torch.nn.Module):
    """model(x, t, y=None) -> the UNet2DModel's prediction; y=None is the null class of a class-conditional
    model (as models.UNet). build(m.config, fused=...) rebuilds it."""

    def __init__(self, unet: dict, num_classes: int | None = None, fused: bool = True):
        super().__init__()
        self.unet = UNet2DModel(**unet)
        self.num_classes, self.fused = num_classes, fused
        # what the trainer and the CLI read (as models.UNet.config), and what build() takes back
        self.config = {"unet": dict(unet), "num_classes": num_classes, "image_size": unet["sample_size"],
                       "out_channels": unet["out_channels"]}
        self.patch_report = dxd.patch(self.unet) if fused else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes is not None and y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        return self.unet(x, t, class_labels=y).sample


def build(config: dict, fused: bool = True) -> DiffusersUNet:
    """The model of a checkpoint's model_config (its "image_size" is derived, not an argument)."""
    return DiffusersUNet(config["unet"], config.get("num_classes"), fused=fused)
