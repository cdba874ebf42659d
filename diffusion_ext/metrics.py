"""Monocular depth metrics: the table of Eigen et al. (NIPS 2014, sec. 4.1) used by every NYU Depth V2 paper.

For predicted ŷ and true y over the valid pixels (y in (1e-3, 10] m, and the given mask):
    d1, d2, d3   fraction with max(y/ŷ, ŷ/y) < 1.25, 1.25², 1.25³   (higher is better)
    rel          mean |ŷ − y| / y
    sq_rel       mean (ŷ − y)² / y
    rms          sqrt(mean (ŷ − y)²)
    rms_log      sqrt(mean (ln ŷ − ln y)²)
    log10        mean |log10 ŷ − log10 y|
Each image's metrics are computed over its own valid pixels and then averaged over images (the usual
protocol of BTS, AdaBins and DenseDepth); pooled=True treats all pixels of the batch as one set.
Predictions are clamped to [min_depth, max_depth] (as those evaluations do) so that logs stay finite.

align="scale" or "scale_shift" first fits s (and t) per image by least squares over the valid pixels,
ŷ ← s·ŷ + t, for affine-invariant predictors (MiDaS, Ranftl et al. 2020, eq. 4, here in depth space).
eigen_crop=True keeps rows 45:471 and columns 41:601 of a 640×480 frame (Eigen's crop as evaluated by
BTS/AdaBins), scaled to the tensors' H×W.
"""
from __future__ import annotations

import json
import math

import torch

KEYS = ("d1", "d2", "d3", "rel", "sq_rel", "rms", "rms_log", "log10")
HIGHER_IS_BETTER = {"d1", "d2", "d3"}
EIGEN_CROP_640x480 = (45, 471, 41, 601)   # rows [45, 471), columns [41, 601)
ALIGN = ("none", "scale", "scale_shift")


def eigen_crop_mask(height: int, width: int, device=None) -> torch.Tensor:
    """(H, W) bool: True inside Eigen's crop scaled from 640×480 to W×H."""
    r0, r1, c0, c1 = EIGEN_CROP_640x480
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    mask[round(r0 * height / 480):round(r1 * height / 480), round(c0 * width / 640):round(c1 * width / 640)] = True
    return mask


def _check(name: str, t, ref_shape=None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != 1:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"depth_metrics: {name} must be a (B, 1, H, W) tensor, got {shape}")
    if ref_shape is not None and t.shape != ref_shape:
        raise ValueError(f"depth_metrics: {name} has shape {tuple(t.shape)}, expected {tuple(ref_shape)} like gt_m")


def align_depth(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Per image, the least-squares s (and t) minimising Σ_valid (s·ŷ + t − y)², applied to ŷ (float64)."""
    if mode == "none":
        return pred
    m = mask.flatten(1).double()
    p = torch.where(mask, pred, 0.0).flatten(1).double()
    g = torch.where(mask, gt, 0.0).flatten(1).double()
    n = m.sum(1).clamp_min(1)
    if mode == "scale":
        s = (p * g).sum(1) / (p * p).sum(1).clamp_min(1e-12)
        t = torch.zeros_like(s)
    else:   # normal equations of [ŷ 1]·[s t]ᵀ = y: 2×2, solved in closed form
        sp, sg, spp, spg = p.sum(1), g.sum(1), (p * p).sum(1), (p * g).sum(1)
        det = n * spp - sp * sp
        ok = det.abs() > 1e-12 * n * spp.clamp_min(1e-12)
        s = torch.where(ok, (n * spg - sp * sg) / torch.where(ok, det, 1.0), 1.0)
        t = torch.where(ok, (sg - s * sp) / n, (sg - sp) / n)
    return pred.double() * s.view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)


def per_image_sums(pred_m, gt_m, valid=None, *, eigen_crop=False, align="none", min_depth=1e-3, max_depth=10.0):
    """(sums (B, 8), counts (B,)) float64: per image, the sums over valid pixels of the eight pixel terms
    [δ<1.25, δ<1.25², δ<1.25³, |e|/y, e²/y, e², (ln ŷ − ln y)², |log10 ŷ − log10 y|] and the pixel count.
    depth_metrics and DepthMetricsAccumulator turn them into the table."""
    _check("gt_m", gt_m)
    _check("pred_m", pred_m, gt_m.shape)
    if align not in ALIGN:
        raise ValueError(f"depth_metrics: align must be one of {ALIGN}, got {align!r}")
    gt = gt_m.detach().double()
    mask = (gt > min_depth) & (gt <= max_depth) & torch.isfinite(gt) & torch.isfinite(pred_m.detach())
    if valid is not None:
        _check("valid", valid, gt_m.shape)
        mask &= valid.to(device=gt.device, dtype=torch.bool)
    if eigen_crop:
        mask &= eigen_crop_mask(gt.shape[-2], gt.shape[-1], gt.device)
    pred = align_depth(pred_m.detach().double(), gt, mask, align)
    pred = pred.clamp(min_depth, max_depth)
    gt = torch.where(mask, gt, torch.ones_like(gt))        # keep logs and divisions finite off the mask
    pred = torch.where(mask, pred, torch.ones_like(pred))
    ratio = torch.maximum(gt / pred, pred / gt)
    err = pred - gt
    lg = torch.log(pred) - torch.log(gt)
    terms = torch.stack([(ratio < 1.25).double(), (ratio < 1.25 ** 2).double(), (ratio < 1.25 ** 3).double(),
                         err.abs() / gt, err * err / gt, err * err, lg * lg, lg.abs() / math.log(10)], 1)  # (B,8,1,H,W)
    m = mask.double().unsqueeze(1)
    return (terms * m).flatten(2).sum(-1), m.flatten(1).sum(-1)


def _finalise(sums: torch.Tensor, counts: torch.Tensor, pooled: bool) -> dict:
    if pooled:
        total = counts.sum()
        if total == 0:
            raise ValueError("depth_metrics: no valid pixel (ground truth in (min_depth, max_depth], mask, crop)")
        means = sums.sum(0) / total
        means[[5, 6]] = means[[5, 6]].sqrt()
    else:
        keep = counts > 0
        if not keep.any():
            raise ValueError("depth_metrics: no image has a valid pixel (ground truth in (min_depth, max_depth], "
                             "mask, crop)")
        per = sums[keep] / counts[keep, None]
        per[:, [5, 6]] = per[:, [5, 6]].sqrt()
        means = per.mean(0)
    return {k: float(v) for k, v in zip(KEYS, means.tolist())}


def depth_metrics(pred_m: torch.Tensor, gt_m: torch.Tensor, valid: torch.Tensor | None = None, *,
                  eigen_crop: bool = False, pooled: bool = False, align: str = "none",
                  min_depth: float = 1e-3, max_depth: float = 10.0) -> dict:
    """The eight metrics (module docstring) of predictions pred_m against ground truth gt_m, both (B, 1, H, W)
    metres; valid (B, 1, H, W) bool restricts the pixels further. Images without a valid pixel are skipped."""
    sums, counts = per_image_sums(pred_m, gt_m, valid, eigen_crop=eigen_crop, align=align,
                                  min_depth=min_depth, max_depth=max_depth)
    return _finalise(sums, counts, pooled)


class DepthMetricsAccumulator:
    """depth_metrics over a data set fed in batches: update(pred_m, gt_m, valid) per batch, then compute()
    gives what depth_metrics would give on all the images at once."""

    def __init__(self, *, eigen_crop: bool = False, pooled: bool = False, align: str = "none",
                 min_depth: float = 1e-3, max_depth: float = 10.0):
        self.kw = dict(eigen_crop=eigen_crop, align=align, min_depth=min_depth, max_depth=max_depth)
        self.pooled = pooled
        self.sums, self.counts = [], []

    def update(self, pred_m, gt_m, valid=None) -> None:
        s, c = per_image_sums(pred_m, gt_m, valid, **self.kw)
        self.sums.append(s.cpu())
        self.counts.append(c.cpu())

    def compute(self) -> dict:
        if not self.sums:
            raise ValueError("DepthMetricsAccumulator.compute: no batch was given to update()")
        return _finalise(torch.cat(self.sums), torch.cat(self.counts), self.pooled)


def metrics_to_dict(metrics: dict, **extra) -> dict:
    """A JSON-able dict: the eight metrics as floats (NaN/inf become None), plus extra entries (e.g. the
    options and the number of images)."""
    out = {}
    for k in KEYS:
        if k not in metrics:
            raise ValueError(f"metrics_to_dict: missing metric {k!r} (expected {KEYS})")
        v = float(metrics[k])
        out[k] = v if math.isfinite(v) else None
    out.update(extra)
    json.dumps(out)   # fail here, not in the caller's writer, if an extra is not JSON-able
    return out


def format_markdown(results: dict, digits: int = 3) -> str:
    """A markdown table: results is one metrics dict, or {row name: metrics dict} for several models."""
    rows = {"": results} if all(k in results for k in KEYS) else results
    head = "| " + " | ".join(["model"] + [f"{k} {'↑' if k in HIGHER_IS_BETTER else '↓'}" for k in KEYS]) + " |"
    lines = [head, "|" + "---|" * (len(KEYS) + 1)]
    for name, m in rows.items():
        cells = [name or "-"] + [f"{float(m[k]):.{digits}f}" for k in KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
