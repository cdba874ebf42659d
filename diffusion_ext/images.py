"""PNG output with PIL only: image grids, a depth colour map, and the loss curve (no matplotlib)."""
from __future__ import annotations

import math
import os

import torch

# Anchors of matplotlib's "viridis" (van der Walt & Smith 2015) at 0, 1/8, ..., 1; linear between them.
_VIRIDIS = torch.tensor([
    [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
], dtype=torch.float32) / 255.0


def colormap(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] of any shape (..., H, W) -> RGB (..., 3, H, W) in [0, 1] (viridis)."""
    x = x.detach().float().clamp(0, 1)
    pos = x * (len(_VIRIDIS) - 1)
    lo = pos.floor().long().clamp(max=len(_VIRIDIS) - 2)
    w = (pos - lo).unsqueeze(-1)
    rgb = _VIRIDIS[lo] * (1 - w) + _VIRIDIS[lo + 1] * w  # (..., H, W, 3)
    return rgb.movedim(-1, -3)


def depth_to_rgb(depth: torch.Tensor, lo: float | None = None, hi: float | None = None) -> torch.Tensor:
    """Depth (B, 1, H, W) -> colour (B, 3, H, W) in [-1, 1]; near is bright (yellow), far is dark.
    The range is [lo, hi] (default: the min and max over the batch, so rows share one scale)."""
    d = depth.detach().float()
    lo = float(d.min()) if lo is None else lo
    hi = float(d.max()) if hi is None else hi
    u = (d[:, 0] - lo) / max(hi - lo, 1e-8)
    return colormap(1 - u) * 2 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, 3); one channel is shown as grey."""
    x = images.detach().float().cpu()
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> one uint8 image (H', W', 3) with the images in rows of `nrow`."""
    x = to_uint8(images)
    B, H, W, _ = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(B)))
    ncol = math.ceil(B / nrow)
    grid = torch.full((padding + ncol * (H + padding), padding + nrow * (W + padding), 3), pad_value, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        y0, x0 = padding + r * (H + padding), padding + c * (W + padding)
        grid[y0:y0 + H, x0:x0 + W] = x[i]
    return grid


def save_png(array: torch.Tensor, path: str, scale: int = 1) -> str:
    """A uint8 (H, W, 3) tensor -> PNG (nearest-neighbour upscaled by `scale`, so 16×16 samples are visible)."""
    from PIL import Image

    img = Image.fromarray(array.numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    img.save(path)
    return path


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None, scale: int | None = None) -> str:
    """Writes a grid PNG of (B, C, H, W) images in [-1, 1]; small images are upscaled to >= 64 px."""
    if scale is None:
        scale = max(1, 64 // images.shape[-1])
    return save_png(make_grid(images, nrow), path, scale)


def load_image(path: str, size: int | None = None) -> torch.Tensor:
    """A PNG/JPEG -> (3, S, S) float32 in [-1, 1] (centre-cropped to a square and resized to `size`)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------------
# loss curve
# ----------------------------------------------------------------------------------------------------
def _smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential smoothing (as TensorBoard's slider)."""
    out, m = [], 0.0
    for i, v in enumerate(values):
        m = beta * m + (1 - beta) * v
        out.append(m / (1 - beta ** (i + 1)))
    return out


def save_loss_curve(steps: list[int], losses: list[float], path: str, title: str = "training loss",
                    size: tuple[int, int] = (640, 400)) -> str:
    """Loss against step on a log-10 y axis: the raw values in light grey, a smoothed line in blue."""
    from PIL import Image, ImageDraw, ImageFont

    W, H = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 8), title, fill="black", font=font)
    pts = [(s, v) for s, v in zip(steps, losses) if v is not None and math.isfinite(v) and v > 0]
    if len(pts) < 1:
        draw.text((left, H // 2), "no finite positive loss values", fill="black", font=font)
    else:
        xs = [p[0] for p in pts]
        ys = [math.log10(p[1]) for p in pts]
        x0, x1 = min(xs), max(xs)
        y0, y1 = math.floor(min(ys) * 4) / 4, math.ceil(max(ys) * 4) / 4
        if x1 == x0:
            x1 = x0 + 1
        if y1 - y0 < 0.25:
            y0, y1 = y0 - 0.125, y1 + 0.125

        def px(x: float, y: float) -> tuple[float, float]:
            return (left + (x - x0) / (x1 - x0) * (W - left - right),
                    top + (y1 - y) / (y1 - y0) * (H - top - bottom))

        # axes, ticks at powers of ten and their halves (log scale), step ticks at five places
        draw.rectangle([left, top, W - right, H - bottom], outline="black")
        k = math.floor(y0)
        while k <= y1:
            for m in (1, 2, 5):
                y = k + math.log10(m)
                if y0 <= y <= y1:
                    _, yy = px(x0, y)
                    draw.line([(left, yy), (W - right, yy)], fill=(225, 225, 225))
                    draw.text((4, yy - 6), f"{10 ** y:.3g}", fill="black", font=font)
            k += 1
        for i in range(5):
            x = x0 + (x1 - x0) * i / 4
            xx, _ = px(x, y0)
            draw.line([(xx, H - bottom), (xx, H - bottom + 4)], fill="black")
            draw.text((xx - 10, H - bottom + 8), f"{int(round(x))}", fill="black", font=font)
        draw.text((W // 2 - 10, H - 16), "step", fill="black", font=font)
        raw = [px(x, y) for x, y in zip(xs, ys)]
        smooth = [px(x, y) for x, y in zip(xs, [math.log10(v) for v in _smooth([p[1] for p in pts])])]
        if len(raw) > 1:
            draw.line(raw, fill=(190, 190, 190), width=1)
            draw.line(smooth, fill=(31, 90, 200), width=2)
        else:
            draw.ellipse([raw[0][0] - 3, raw[0][1] - 3, raw[0][0] + 3, raw[0][1] + 3], fill=(31, 90, 200))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    img.save(path)
    return path
