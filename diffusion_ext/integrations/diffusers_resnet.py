"""diffusers' ResnetBlock2D and the output norm of its UNets and VAEs with group_norm_act.

ResnetBlock2D (diffusers.models.resnet) computes, for time_embedding_norm "default" (Ho et al. 2020,
App. B; the block of every UNet2DModel, UNet2DConditionModel and AutoencoderKL encoder/decoder block):

    h = conv1(act(GN1(x)));  h = h + Linear(act(temb));  h = conv2(dropout(act(GN2(h))));  out = (skip(x) + h) / s

and for "scale_shift" (Dhariwal & Nichol 2021, "AdaGN"): act(GN2(h)·(1 + scale) + shift) with
(scale, shift) = chunk(Linear(act(temb)), 2). Both GN→act pairs become one group_norm_act call each (the
scale_shift pair through the op's FiLM scale and shift). The block's nn.Dropout gets a forward on
ops.dropout (its mask made in the kernel: nn/dropout.py), patched on its own (`patch(..., dropout=False)`
leaves it to torch). Everything else (convolutions, up/down-sampling, FIR kernels included, the skip) is
the block's own modules, called as diffusers calls them.
"""
from __future__ import annotations

import torch

from .binding import bind, patch_function, taken_by_someone_else, unbind
from ..nn.dropout import dropout as fused_dropout
from .fused_norm import fused_activation, group_norm_act, runs_fused

RESNET_KIND = "ResnetBlock2D: norm1→act, norm2→act as group_norm_act"
FILM_KIND = "ResnetBlock2D scale_shift: act(GN(h)·(1 + scale) + shift) as group_norm_act"
NORM_OUT_KIND = "conv_norm_out + conv_act as group_norm_act"
DROPOUT_KIND = "ResnetBlock2D dropout: the mask made in the kernel (ops.dropout)"


@patch_function
def resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
    """ResnetBlock2D.forward (diffusers' steps) with both GroupNorm→activation pairs fused, scale_shift's FiLM
    included. Inputs the kernels do not take, and diffusers' deprecated extra arguments, run diffusers'
    forward."""
    act = fused_activation(self.nonlinearity)
    if args or kwargs or not runs_fused(input_tensor) or act is None or \
            (self.time_embedding_norm == "scale_shift" and temb is None):
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    # 1. h = act(GN1(x))
    hidden_states = group_norm_act(self.norm1, input_tensor, act)
    # 2. up/down-sampling of both paths, by the block's own modules (FIR kernels included)
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:  # diffusers' workaround for upsample_nearest_nhwc (its issue 984)
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)
    # 3. the time embedding: one bias per channel ("default") or a scale and a shift ("scale_shift")
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if self.time_embedding_norm == "scale_shift":
        scale, shift = torch.chunk(temb, 2, dim=1)  # (N, C, 1, 1) each
        # 4. h = act(GN2(h)·(1 + scale) + shift) in one pass (FiLM, Perez et al. 2018), scale/shift (N, C)
        hidden_states = group_norm_act(self.norm2, hidden_states, act, scale=scale.flatten(1),
                                       shift=shift.flatten(1))
    else:
        # 4. h = act(GN2(h + temb))
        if temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = group_norm_act(self.norm2, hidden_states, act)
    # 5. h = conv2(dropout(h)); out = (skip(x) + h) / output_scale_factor
    hidden_states = self.conv2(self.dropout(hidden_states))
    if self.conv_shortcut is not None:
        if self.training:  # as diffusers: DDP's gradient-stride check wants a contiguous input here
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    out = input_tensor + hidden_states
    # x / 1 is x exactly: skip the pass over the activations for the usual factor (3.7% of a bf16 sampling
    # forward of the report's UNet2DModel on the AMX Xeon, profiled)
    return out if self.output_scale_factor == 1 else out / self.output_scale_factor


def patch_resnet(block, path: str, where: str, report) -> None:
    """Binds resnet_forward on one ResnetBlock2D, or records why its own forward stays."""
    if taken_by_someone_else(block, "forward"):
        report.add_kept(path, "ResnetBlock2D", "its forward was already replaced by another library", where)
        return
    act = fused_activation(block.nonlinearity)
    if act is None:
        report.add_kept(path, "ResnetBlock2D", f"activation {type(block.nonlinearity).__name__} has no fused kernel "
                                               f"(SiLU, ReLU)", where)
        return
    bind(block, "forward", resnet_forward)
    report.add_fused(path, RESNET_KIND, where)
    if block.time_embedding_norm == "scale_shift":
        report.add_fused(path, FILM_KIND, where)
    if block.upsample is not None or block.downsample is not None:
        if not isinstance(block.upsample or block.downsample, torch.nn.Module):
            report.add_kept(path, "ResnetBlock2D FIR/sde_vp up/down-sampling",
                            "not a norm: diffusers' resampling runs between the fused norms", where)


def unpatch_resnet(block) -> bool:
    return unbind(block, "forward")


# ----------------------------------------------------------------------------------------------------
# the ResnetBlock2D's dropout: torch's CPU generator draws the Bernoulli mask at ~7 ms per million elements
# here, ~5% of a training step at dropout 0.1; ops.dropout makes it in the kernel (nn/dropout.py).
# ----------------------------------------------------------------------------------------------------
@patch_function
def dropout_forward(self, x: torch.Tensor) -> torch.Tensor:
    """nn.Dropout.forward with the mask made in the kernel (torch's dropout while compiling, and for tensors
    the kernels do not take)."""
    return fused_dropout(x, self.p, self.training)


def patch_dropout(block, path: str, where: str, report) -> None:
    """Binds dropout_forward on a ResnetBlock2D's nn.Dropout when it drops anything (p > 0)."""
    drop = getattr(block, "dropout", None)
    if type(drop) is not torch.nn.Dropout or drop.p == 0:
        return
    if taken_by_someone_else(drop, "forward"):
        report.add_kept(f"{path}.dropout", "ResnetBlock2D dropout", "its forward was already replaced by another "
                                                                    "library", where)
        return
    bind(drop, "forward", dropout_forward)
    report.add_fused(f"{path}.dropout", DROPOUT_KIND, where)


def unpatch_dropout(block) -> bool:
    drop = getattr(block, "dropout", None)
    return drop is not None and unbind(drop, "forward")


# ----------------------------------------------------------------------------------------------------
# conv_norm_out + conv_act: the last GroupNorm→SiLU of UNet2DModel, UNet2DConditionModel and the VAE's
# Encoder/Decoder. The parent's forward calls conv_norm_out then conv_act back to back (and nothing else
# calls them), so conv_norm_out computes SiLU(GN(x)) and conv_act passes its input through.
# ----------------------------------------------------------------------------------------------------
@patch_function
def norm_out_forward(self, x: torch.Tensor) -> torch.Tensor:
    """conv_norm_out: SiLU(GN(x)) in one pass; the activation of conv_act (now the identity) included."""
    if not runs_fused(x):
        return torch.nn.functional.silu(type(self).forward(self, x))
    return group_norm_act(self, x, "silu")


@patch_function
def act_after_fused_norm(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG001
    """conv_act: the identity, because conv_norm_out already applied SiLU."""
    return x


def patch_norm_out(parent, path: str, report) -> None:
    """Fuses parent.conv_norm_out + parent.conv_act when they are an nn.GroupNorm and an nn.SiLU."""
    norm, act = getattr(parent, "conv_norm_out", None), getattr(parent, "conv_act", None)
    prefix = f"{path}." if path else ""
    kind = type(parent).__name__
    if norm is None:
        return
    if type(norm) is not torch.nn.GroupNorm or type(act) is not torch.nn.SiLU:
        report.add_kept(f"{prefix}conv_norm_out", "conv_norm_out + conv_act",
                        f"{type(norm).__name__} + {type(act).__name__} (spatial/ada norm or another activation) "
                        f"has no fused kernel", kind)
        return
    if taken_by_someone_else(norm, "forward") or taken_by_someone_else(act, "forward"):
        report.add_kept(f"{prefix}conv_norm_out", "conv_norm_out + conv_act",
                        "their forward was already replaced by another library", kind)
        return
    bind(norm, "forward", norm_out_forward)
    bind(act, "forward", act_after_fused_norm)
    report.add_fused(f"{prefix}conv_norm_out", NORM_OUT_KIND, kind)


def unpatch_norm_out(parent) -> bool:
    norm, act = getattr(parent, "conv_norm_out", None), getattr(parent, "conv_act", None)
    if norm is None or act is None:
        return False
    return unbind(norm, "forward") | unbind(act, "forward")
