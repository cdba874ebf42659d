"""Inputs in every layout the ops promise to handle: contiguous, channels_last, strided views."""
import torch

# (shape, layout) pairs: awkward sizes (odd spatial, one element per sample, batch 1, 1-D and 5-D).
CASES = [
    ((4, 3, 8, 9), "contiguous"),
    ((4, 3, 8, 9), "channels_last"),
    ((3, 5, 7, 7), "strided"),
    ((1, 1, 1, 1), "contiguous"),
    ((5, 7), "contiguous"),
    ((6,), "contiguous"),
    ((2, 3, 2, 3, 5), "channels_last_3d"),
    ((2, 4, 33), "transposed"),
]


def make(shape, layout, dtype, device, generator=None):
    """A random tensor of `shape` in `layout` (values ~ N(0, 1))."""
    def randn(s):
        return torch.randn(s, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    if layout == "contiguous":
        return randn(shape)
    if layout == "channels_last":
        return randn(shape).contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return randn(shape).contiguous(memory_format=torch.channels_last_3d)
    if layout == "strided":  # every other element of the last dim: not dense
        return randn(shape[:-1] + (shape[-1] * 2,))[..., ::2]
    if layout == "transposed":  # dense, but the batch is not the outermost dim in memory
        return randn((shape[0], shape[2], shape[1])).transpose(1, 2)
    raise ValueError(layout)


def same_layout(like, dtype, device, generator=None):
    """Another random tensor with the layout of `like`."""
    out = torch.empty_like(like, dtype=dtype, device=device)
    out.copy_(torch.randn(like.shape, generator=generator, dtype=torch.float64))
    return out
