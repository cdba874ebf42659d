"""UNet: the ε-prediction network of DDPM (Ho et al. 2020, App. B) with the improvements of Dhariwal &
Nichol 2021 (several attention heads, attention in the bottleneck, zero-initialised output convolutions)
and optional class conditioning with a null class for classifier-free guidance (Ho & Salimans 2022)."""
from __future__ import annotations

import torch

from ._config import divisible_by_groups, int_list, one_of, positive_int
from .blocks import TIME_EMBEDDING_NORMS, AttentionBlock, Downsample, ResBlock, TimestepSequential, Upsample
from .embeddings import TimestepEmbedding
from ..nn import GroupNormAct
from ..nn.layout import runs_channels_last

# The head dims diffusion_ext.attention accepts: multiples of 8 from 8 to this (kAttentionMaxHeadDim in
# csrc/attention_args.h).
ATTENTION_MAX_HEAD_DIM = 256


def _capturing(y: torch.Tensor) -> bool:
    return y.is_cuda and torch.cuda.is_current_stream_capturing()


class UNet(torch.nn.Module):
    """A U-Net over (B, in_channels, S, S) images conditioned on the timestep t and, optionally, a class y.

    Level i (of len(channel_mults)) runs at resolution image_size / 2^i with base_channels·channel_mults[i]
    channels and num_res_blocks ResBlocks, followed by an attention block when its resolution is listed in
    attention_resolutions; the bottleneck is ResBlock, attention, ResBlock. The decoder mirrors the
    encoder with num_res_blocks + 1 blocks per level, each fed the matching encoder activation (skip).

    num_classes: None for an unconditional model; otherwise y takes values 0..num_classes, where the index
    num_classes is the null class ("no label"): a model trained with labels dropped to it at random
    (Diffusion.training_loss(p_uncond=...)) gives both the conditional and the unconditional prediction
    needed for classifier-free guidance. y=None means the null class.

    time_embedding_norm: "default" adds the embedding to each ResBlock's activations before its second norm;
    "scale_shift" modulates that norm with it, GN(h)·(1 + scale) + shift (AdaGN, Nichol & Dhariwal 2021), the
    embedding projections giving 2C values (ResBlock).

    fused=True builds the diffusion_ext kernels (GroupNormAct, flash attention), fused=False the eager
    PyTorch equivalents, with the same parameter names. `config` holds the constructor arguments (except
    fused) as JSON types, so `UNet(**m.config, fused=...)` rebuilds the model.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_channels: int = 64,
                 channel_mults=(1, 2, 2, 2), num_res_blocks: int = 2, attention_resolutions=(16,),
                 image_size: int = 64, dropout: float = 0.1, head_dim: int | None = 32, num_groups: int = 32,
                 num_classes: int | None = None, time_embedding_norm: str = "default", fused: bool = True):
        super().__init__()
        c = "UNet"
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("base_channels", base_channels), ("num_res_blocks", num_res_blocks),
                        ("image_size", image_size), ("num_groups", num_groups)):
            positive_int(c, name, v)
        mults = int_list(c, "channel_mults", channel_mults)
        attn_res = int_list(c, "attention_resolutions", attention_resolutions, allow_empty=True)
        if num_classes is not None:
            positive_int(c, "num_classes", num_classes)
        one_of(c, "time_embedding_norm", time_embedding_norm, TIME_EMBEDDING_NORMS)
        if head_dim is not None:
            positive_int(c, "head_dim", head_dim)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"{c}: dropout = {dropout!r}; expected a number in [0, 1)")
        levels = len(mults)
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"{c}: image_size = {image_size} is not divisible by 2^{levels - 1} = {2 ** (levels - 1)} "
                             f"(one 2× downsample between each of the {levels} levels of channel_mults)")
        resolutions = [image_size // 2**i for i in range(levels)]
        for r in attn_res:
            if r not in resolutions:
                raise ValueError(f"{c}: attention_resolutions contains {r}, a resolution that never occurs; the levels "
                                 f"run at resolutions {resolutions}")
        divisible_by_groups(c, "base_channels", base_channels, num_groups)
        for i, m in enumerate(mults):
            divisible_by_groups(c, f"base_channels × channel_mults[{i}]", base_channels * m, num_groups)
        for i, m in enumerate(mults):
            if not (resolutions[i] in attn_res or i == levels - 1):
                continue
            width = base_channels * m
            if head_dim is not None and width % head_dim:
                raise ValueError(f"{c}: base_channels × channel_mults[{i}] = {width} channels of an "
                                 f"attention block are not divisible by head_dim = {head_dim}")
            d = width if head_dim is None else head_dim  # head_dim=None: one head over all channels
            if d % 8 or not 8 <= d <= ATTENTION_MAX_HEAD_DIM:
                raise ValueError(f"{c}: the attention block over base_channels × channel_mults[{i}] = {width} channels "
                                 f"has head dim {d} (head_dim = {head_dim}); the fused attention kernel needs a "
                                 f"multiple of 8 from 8 to {ATTENTION_MAX_HEAD_DIM}, and the eager model is held to "
                                 f"it too so that its checkpoints load into the fused one")

        self.config = dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                           channel_mults=mults, num_res_blocks=num_res_blocks, attention_resolutions=attn_res,
                           image_size=image_size, dropout=float(dropout), head_dim=head_dim, num_groups=num_groups,
                           num_classes=num_classes, time_embedding_norm=time_embedding_norm)
        self.in_channels, self.out_channels, self.num_classes = in_channels, out_channels, num_classes
        self.fused = fused
        self.downsample_factor = 2 ** (levels - 1)

        ch, G = base_channels, num_groups
        emb_dim = 4 * ch

        def res(cin, cout):
            return ResBlock(cin, cout, emb_dim, dropout, G, fused, time_embedding_norm)

        def attn(channels):
            return AttentionBlock(channels, head_dim=head_dim, num_groups=G, fused=fused)

        self.time_embed = TimestepEmbedding(ch, emb_dim)
        # num_classes + 1 rows: the last one is the null class
        self.class_embed = torch.nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        self.conv_in = torch.nn.Conv2d(in_channels, ch, 3, padding=1)

        self.input_blocks = torch.nn.ModuleList()
        skips, cur = [ch], ch
        for level, mult in enumerate(mults):
            for _ in range(num_res_blocks):
                layers = [res(cur, ch * mult)]
                cur = ch * mult
                if resolutions[level] in attn_res:
                    layers.append(attn(cur))
                self.input_blocks.append(TimestepSequential(*layers))
                skips.append(cur)
            if level != levels - 1:
                self.input_blocks.append(TimestepSequential(Downsample(cur)))
                skips.append(cur)

        self.mid_block = TimestepSequential(res(cur, cur), attn(cur), res(cur, cur))

        self.output_blocks = torch.nn.ModuleList()
        for level in reversed(range(levels)):
            for i in range(num_res_blocks + 1):
                layers = [res(cur + skips.pop(), ch * mults[level])]
                cur = ch * mults[level]
                if resolutions[level] in attn_res:
                    layers.append(attn(cur))
                if level and i == num_res_blocks:
                    layers.append(Upsample(cur))
                self.output_blocks.append(TimestepSequential(*layers))

        self.out_norm = GroupNormAct(G, cur, activation="silu", fused=fused)
        self.conv_out = torch.nn.Conv2d(cur, out_channels, 3, padding=1)
        torch.nn.init.zeros_(self.conv_out.weight)  # the untrained model predicts ε = 0 (Ho et al.'s init_scale=0)
        torch.nn.init.zeros_(self.conv_out.bias)

    def _check(self, x: torch.Tensor, t, y) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet.forward: x must be (B, in_channels={self.in_channels}, S, S), got {tuple(x.shape)}")
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"UNet.forward: x's spatial size {tuple(x.shape[2:])} is not divisible by {f} "
                             f"(2^(levels − 1))")
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"UNet.forward: t must be (B,) = ({B},) or a scalar, got {tuple(t.shape)}")
        if y is not None:
            if self.num_classes is None:
                raise ValueError("UNet.forward: y was given but the model has num_classes = None (unconditional)")
            if y.shape != (B,) or y.dtype != torch.long:
                raise ValueError(f"UNet.forward: y must be an int64 tensor of shape ({B},), got {y.dtype} "
                                 f"{tuple(y.shape)}")
            # an out-of-range index is a device-side assert on CUDA (fatal to the process): check it here, at the
            # cost of one sync; a torch.compile trace skips it rather than break the graph on a data-dependent
            # branch, and so does a CUDA graph capture (sampling/graphed.py), where a sync is an error
            if B and not torch.compiler.is_compiling() and not _capturing(y) and \
                    bool(((y < 0) | (y > self.num_classes)).any()):
                raise ValueError(f"UNet.forward: y holds labels outside 0..num_classes = {self.num_classes} (the "
                                 f"index num_classes is the null class): min {int(y.min())}, max {int(y.max())}")
        return t

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        t = self._check(x, t, y)
        if self.fused and runs_channels_last(x):
            # sampling on a CPU: every convolution on channels_last activations, the output in x's layout
            # (nn/layout.py: oneDNN reorders NCHW activations in and out per convolution)
            return self._forward(x.contiguous(memory_format=torch.channels_last), t, y).contiguous()
        return self._forward(x, t, y)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        # 1. emb = MLP(sinusoidal(t)) (Ho et al. 2020, App. B) + the class embedding (the null class when y is
        #    None), so that one network gives ε(x_t, y) and ε(x_t, ∅) (Ho & Salimans 2022, Alg. 1)
        emb = self.time_embed(t)
        if self.class_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(y)
        # 2. encoder: keep every block's output for the skips
        h = self.conv_in(x)
        skips = [h]
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        # 3. bottleneck: ResBlock, self-attention, ResBlock
        h = self.mid_block(h, emb)
        # 4. decoder: each block sees its encoder activation concatenated on channels
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        # 5. out = conv(SiLU(GroupNorm(h)))
        return self.conv_out(self.out_norm(h))
