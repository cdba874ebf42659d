"""depth_metrics against values computed by hand on tiny tensors."""
import json
import math

import pytest
import torch

from diffusion_ext.metrics import (KEYS, DepthMetricsAccumulator, depth_metrics, eigen_crop_mask, format_markdown,
                                   metrics_to_dict)


def gt(B=2, H=6, W=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, 1, H, W, generator=g, dtype=torch.float64) * 4 + 1).float()   # 1..5 m


def test_perfect_prediction():
    y = gt()
    m = depth_metrics(y.clone(), y)
    assert set(m) == set(KEYS)
    assert m["d1"] == m["d2"] == m["d3"] == 1.0
    for k in ("rel", "sq_rel", "rms", "rms_log", "log10"):
        assert m[k] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("c", [1.1, 1.4, 0.7])
def test_constant_scaling_known_values(c):
    y = gt()
    m = depth_metrics(c * y, y)
    r = max(c, 1 / c)
    assert m["d1"] == float(r < 1.25) and m["d2"] == float(r < 1.25 ** 2) and m["d3"] == 1.0
    assert m["rel"] == pytest.approx(abs(c - 1), rel=1e-5)
    assert m["rms_log"] == pytest.approx(abs(math.log(c)), rel=1e-5)
    assert m["log10"] == pytest.approx(abs(math.log10(c)), rel=1e-5)
    yd = y.double()
    per_image_rms = ((c - 1) ** 2 * yd ** 2).flatten(1).mean(1).sqrt()       # averaged over images, not pooled
    assert m["rms"] == pytest.approx(float(per_image_rms.mean()), rel=1e-5)
    assert m["sq_rel"] == pytest.approx((c - 1) ** 2 * float(yd.mean()), rel=1e-5)
    pooled = depth_metrics(c * y, y, pooled=True)
    assert pooled["rms"] == pytest.approx(abs(c - 1) * float(yd.pow(2).mean().sqrt()), rel=1e-5)


def test_hand_computed_two_pixels_and_averaging():
    # image 0: y = (1, 2), ŷ = (2, 2); image 1: y = (4), ŷ = (2) plus one invalid pixel (y = 0)
    y = torch.tensor([[[[1.0, 2.0]]], [[[4.0, 0.0]]]])
    p = torch.tensor([[[[2.0, 2.0]]], [[[2.0, 7.0]]]])
    m = depth_metrics(p, y)
    # per image: image 0 rel = (1 + 0)/2 = 0.5, image 1 rel = 0.5 -> 0.5; d1: 0.5 and 0 -> 0.25
    assert m["rel"] == pytest.approx(0.5) and m["d1"] == pytest.approx(0.25) and m["d2"] == pytest.approx(0.25)
    assert m["d3"] == pytest.approx(0.25)   # 1.25³ ≈ 1.95 < 2: a ratio of 2 fails every threshold
    assert m["sq_rel"] == pytest.approx(((1 / 1 + 0) / 2 + 4 / 4) / 2)
    assert m["rms"] == pytest.approx((math.sqrt(0.5) + 2.0) / 2)
    assert m["rms_log"] == pytest.approx((math.log(2) / math.sqrt(2) + math.log(2)) / 2)
    pooled = depth_metrics(p, y, pooled=True)                  # 3 valid pixels as one set
    assert pooled["rel"] == pytest.approx((1 + 0 + 0.5) / 3) and pooled["rms"] == pytest.approx(math.sqrt(5 / 3))
    # a mask removes pixels; an image with none left is skipped
    valid = torch.tensor([[[[True, False]]], [[[False, False]]]])
    m = depth_metrics(p, y, valid)
    assert m["rel"] == pytest.approx(1.0) and m["d3"] == 0.0


def test_alignment_recovers_affine_distortion():
    y = gt(B=3)
    s = torch.tensor([0.5, 2.0, 3.0]).view(3, 1, 1, 1)
    t = torch.tensor([0.3, -1.0, 2.0]).view(3, 1, 1, 1)
    distorted = (y - t) / s                        # s·ŷ + t = y
    assert depth_metrics(distorted, y)["d1"] < 1
    m = depth_metrics(distorted, y, align="scale_shift")
    assert m["d1"] == 1.0 and m["rel"] < 1e-5 and m["rms"] < 1e-5
    m = depth_metrics(y / s, y, align="scale")
    assert m["d1"] == 1.0 and m["rel"] < 1e-5
    # scale-only cannot undo a shift
    assert depth_metrics(distorted, y, align="scale")["rel"] > 1e-3
    # invalid pixels do not enter the fit
    bad = distorted.clone()
    bad[:, :, 0, 0] = 100.0
    valid = torch.ones_like(y, dtype=torch.bool)
    valid[:, :, 0, 0] = False
    assert depth_metrics(bad, y, valid, align="scale_shift")["rms"] < 1e-5


def test_eigen_crop_masks_the_border():
    mask = eigen_crop_mask(480, 640)
    assert mask[45:471, 41:601].all() and mask.sum() == (471 - 45) * (601 - 41)
    m = eigen_crop_mask(48, 64)                   # scaled by 1/10: rows 4..47 (4.5 -> 4, 47.1 -> 47), cols 4..60
    assert m.sum() == (47 - 4) * (60 - 4) and not m[0].any() and not m[:, -1].any()
    y = gt(B=1, H=48, W=64)
    p = y.clone()
    p[..., :4, :] = 50.0                           # wrong only outside the crop
    p[..., :, 60:] = 50.0
    assert depth_metrics(p, y)["d1"] < 1
    assert depth_metrics(p, y, eigen_crop=True)["d1"] == 1.0


def test_accumulator_matches_one_call():
    y, p = gt(B=5), gt(B=5, seed=1)
    for pooled in (False, True):
        acc = DepthMetricsAccumulator(pooled=pooled)
        acc.update(p[:2], y[:2])
        acc.update(p[2:], y[2:])
        whole = depth_metrics(p, y, pooled=pooled)
        assert acc.compute() == pytest.approx(whole)


def test_formatting_and_errors():
    m = depth_metrics(gt() * 1.1, gt())
    d = metrics_to_dict(m, images=2, align="none")
    assert json.loads(json.dumps(d)) == d and d["images"] == 2
    table = format_markdown({"ddpm": m, "ddim": m})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| model | d1 ↑") and lines[2].startswith("| ddpm | ")
    assert f"{m['rel']:.3f}" in lines[2]
    assert len(format_markdown(m).splitlines()) == 3
    with pytest.raises(ValueError, match="depth_metrics: pred_m"):
        depth_metrics(torch.ones(2, 1, 4, 4), torch.ones(2, 1, 4, 5))
    with pytest.raises(ValueError, match="depth_metrics: gt_m"):
        depth_metrics(torch.ones(4, 4), torch.ones(4, 4))
    with pytest.raises(ValueError, match="align"):
        depth_metrics(gt(), gt(), align="affine")
    with pytest.raises(ValueError, match="no image has a valid pixel"):
        depth_metrics(gt(), torch.zeros(2, 1, 6, 8))
