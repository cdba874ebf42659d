"""An attention processor for diffusers' `Attention` that runs diffusion_ext's group norm and flash attention.

It replaces the default processors (AttnProcessor2_0, AttnProcessor) and keeps the one it replaced, to
hand back on unpatch and to run for the calls it does not take (an attention mask, a dtype or device the
kernels do not take, diffusers' deprecated extra arguments). It computes, as those processors do:

    x̂ = GroupNorm(x) (when the layer has one);  q = x̂·W_q;  k, v = c·W_k, c·W_v (c = x̂, or the encoder states
    for cross-attention, Lk ≠ Lq);  out = softmax(s·q·kᵀ)·v (Vaswani et al. 2017, eq. 1);
    y = (out·W_o [+ x]) / rescale_output_factor

with q, k, v the (B, heads, L, head_dim) views of the projections, read by the kernel without a copy (head
dim innermost), and the output merging its heads for free (diffusion_ext.ops.attention's layout).
"""
from __future__ import annotations

from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from .. import ops
from .fused_norm import group_norm_act, runs_fused

ATTENTION_KIND = "Attention: fused attention processor"
ATTENTION_NORM_KIND = "Attention group_norm as group_norm_act"
DEFAULT_PROCESSORS = (AttnProcessor2_0, AttnProcessor)
# the head dims the kernel takes (csrc/attention_args.h kAttentionMaxHeadDim)
MAX_HEAD_DIM = 256


class FusedAttnProcessor:
    """The processor patch() installs; `original` is the processor it replaced."""

    def __init__(self, original, scale: float):
        self.original = original
        # AttnProcessor2_0 lets SDPA take its default 1/√head_dim, AttnProcessor uses attn.scale: keep theirs
        self.scale = scale

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None or args or kwargs or not runs_fused(hidden_states):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        input_ndim = hidden_states.ndim
        # 1. group norm over the channels, then the map as tokens (B, L, C)
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            if attn.group_norm is not None:  # on (B, C, H, W) itself: the statistics of (B, C, H·W)
                hidden_states = group_norm_act(attn.group_norm, hidden_states, "none")
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        elif attn.group_norm is not None:  # (B, L, C): normalised as (B, C, L), read channels-last, no copy
            hidden_states = group_norm_act(attn.group_norm, hidden_states.transpose(1, 2), "none").transpose(1, 2)
        batch = hidden_states.shape[0]
        # 2. projections; cross-attention takes k, v from the (optionally normalised) encoder states
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, L, heads·D) -> (B, heads, L, D) views, head dim innermost
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # 3. softmax(s·q·kᵀ)·v, flash-style (Dao 2023); the (B, heads, Lq, D) output is (B, Lq, heads, D) memory
        out = ops.attention(query, key, value, self.scale)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        # 4. output projection, dropout, back to (B, C, H, W), residual, rescale
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        # (x / 1 is x exactly: no pass over the activations for the usual factor)
        return hidden_states if attn.rescale_output_factor == 1 else hidden_states / attn.rescale_output_factor


def _why_not(attn: Attention) -> str | None:
    """Why the fused processor cannot stand in for this layer's (None: it can)."""
    proc = attn.processor
    if isinstance(proc, FusedAttnProcessor):
        return None
    if type(proc) not in DEFAULT_PROCESSORS:
        return f"it has the processor {type(proc).__name__} (only AttnProcessor2_0 / AttnProcessor are replaced)"
    if attn.spatial_norm is not None:
        return "spatial norm (SpatialNorm, MoVQ) has no fused kernel"
    if attn.to_k is None or attn.to_v is None or attn.to_out is None:
        return "it has no to_k/to_v/to_out (added-KV or pre-only layer)"
    if attn.inner_kv_dim != attn.inner_dim:
        return f"grouped-query attention (kv dim {attn.inner_kv_dim} ≠ q dim {attn.inner_dim})"
    d = attn.inner_dim / attn.heads
    if d % 8 or not 8 <= d <= MAX_HEAD_DIM:
        return f"head dim {d:g} ({attn.inner_dim} channels / {attn.heads} heads) is not a multiple of 8 from 8 to " \
               f"{MAX_HEAD_DIM}, which the fused kernel needs"
    return None


def patch_attention(attn: Attention, path: str, where: str, report) -> None:
    """Installs FusedAttnProcessor on one Attention layer, or records why its processor stays."""
    why = _why_not(attn)
    if why is not None:
        report.add_kept(path, "Attention", why, where)
        return
    if not isinstance(attn.processor, FusedAttnProcessor):
        proc = attn.processor
        scale = (attn.inner_dim // attn.heads) ** -0.5 if isinstance(proc, AttnProcessor2_0) else attn.scale
        attn.set_processor(FusedAttnProcessor(proc, scale))
    report.add_fused(path, ATTENTION_KIND, where)
    if attn.group_norm is not None:
        report.add_fused(path, ATTENTION_NORM_KIND, where)


def unpatch_attention(attn: Attention) -> bool:
    if not isinstance(attn.processor, FusedAttnProcessor):
        return False
    attn.set_processor(attn.processor.original)
    return True
