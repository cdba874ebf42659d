"""Depth prediction with a trained depth diffusion model, and its evaluation (predict-depth, eval-depth).

A prediction samples depth (in the model's [-1, 1] units) conditioned on the RGB image, as the model was
trained (Diffusion.sample(cond=image)); an ensemble of K samples from different noise is reduced by the
per-pixel median (K odd: the middle value; K even: the lower of the two middle values), which Marigold
(Ke et al. 2024, §3.4) found more robust than the mean for depth.
"""
from __future__ import annotations

import json
import os

import torch


@torch.no_grad()
def predict(trained, images: torch.Tensor, *, ensemble: int = 1, sampler: str = "ddim", steps: int | None = None,
            seed: int = 0) -> torch.Tensor:
    """images (B, 3, S, S) in [-1, 1] -> depth in metres (B, 1, S, S)."""
    from .data.common import unit_to_depth

    if ensemble < 1:
        raise ValueError(f"predict: ensemble = {ensemble}; expected at least 1")
    B, _, H, W = images.shape
    cond = images.repeat(ensemble, 1, 1, 1)  # sample k of image b at row k·B + b
    x = trained.diffusion.sample(trained.model, (B * ensemble, 1, H, W), cond=cond, sampler=sampler, steps=steps,
                                 seed=seed, device=images.device)
    x = x.view(ensemble, B, 1, H, W).median(dim=0).values if ensemble > 1 else x
    return unit_to_depth(x.float())


def evaluate(trained, data: str, *, split: str = "test", data_size: int | None = None, limit: int | None = None,
             batch_size: int = 16, eigen_crop: bool = False, pooled: bool = False, align: str = "none",
             ensemble: int = 1, sampler: str = "ddim", steps: int | None = None, seed: int = 0,
             out_dir: str = ".") -> dict:
    """Predicts the split, computes metrics.depth_metrics over all of it, writes eval_depth.json, .md and
    eval_depth.png (rows of image | ground truth | prediction, one depth colour scale); returns the paths
    and the table."""
    from .data import build_dataset
    from .images import depth_to_rgb, save_grid
    from .metrics import depth_metrics

    size = trained.model.config["image_size"]
    kw = {"size": data_size} if data_size is not None and str(data).startswith("builtin:") else {}
    ds = build_dataset(data, image_size=size, split=split, seed=trained.config.get("seed", 0), **kw)
    if getattr(ds, "kind", None) != "depth":
        raise ValueError(f"eval-depth: data {data!r} is not a depth data set")
    n = len(ds) if limit is None else min(limit, len(ds))
    if n < 1:
        raise ValueError(f"eval-depth: data {data!r} ({split}) has no items")
    device = next(trained.model.parameters()).device
    images, preds, gts, valids = [], [], [], []
    collate = torch.utils.data.default_collate
    for i in range(0, n, batch_size):
        b = collate([ds[j] for j in range(i, min(n, i + batch_size))])
        img = b["image"].to(device)
        preds.append(predict(trained, img, ensemble=ensemble, sampler=sampler, steps=steps, seed=seed + i).cpu())
        images.append(b["image"])
        gts.append(b["depth_m"].float())
        valids.append(b["valid"])
    pred, gt, valid = torch.cat(preds), torch.cat(gts), torch.cat(valids)
    metrics = depth_metrics(pred, gt, valid, eigen_crop=eigen_crop, pooled=pooled, align=align)
    metrics = {k: float(v) for k, v in metrics.items()}
    setting = {"checkpoint_step": trained.meta.get("step"), "data": str(data), "split": split, "num_images": n,
               "eigen_crop": eigen_crop, "pooled": pooled, "align": align, "ensemble": ensemble,
               "sampler": sampler, "steps": steps}
    md = _markdown(metrics, setting)
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, "eval_depth." + k) for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump({"metrics": metrics, **setting}, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(md)
    k = min(8, n)
    lo, hi = float(gt[:k][valid[:k]].min()) if valid[:k].any() else 0.0, float(gt[:k].max())
    colour = depth_to_rgb(torch.cat([gt[:k], pred[:k]]), lo, hi)
    rows = torch.stack([torch.cat(images)[:k], colour[:k], colour[k:]], 1).flatten(0, 1)
    save_grid(rows, paths["png"], nrow=3)
    return {"metrics": metrics, "markdown": md, **paths}


NAMES = [("d1", "δ1 ↑"), ("d2", "δ2 ↑"), ("d3", "δ3 ↑"), ("rel", "REL ↓"), ("sq_rel", "SqRel ↓"), ("rms", "RMS ↓"),
         ("rms_log", "RMSlog ↓"), ("log10", "log10 ↓")]


def _markdown(metrics: dict, setting: dict) -> str:
    head = "| " + " | ".join(label for _, label in NAMES) + " |\n|" + "---|" * len(NAMES) + "\n"
    row = "| " + " | ".join(f"{metrics[k]:.3f}" for k, _ in NAMES) + " |\n"
    how = ", ".join(f"{k} {v}" for k, v in setting.items())
    return f"Depth metrics ({how}):\n\n{head}{row}"
