"""`python -m diffusion_ext train --task depth | predict-depth | eval-depth` from the command line, on a
depth model trained for 2 steps on builtin:depth-scenes: the files each command writes, that the ensemble
is the per-pixel median of its samples, that eval-depth's numbers are metrics.depth_metrics of the
predictions, NYU folders and .mat files as --data, and clear errors. (That the model learns:
test_depth_learning.py.)"""
import json

import pytest
import torch
from PIL import Image

from diffusion_ext import depth_tools
from diffusion_ext.checkpoint import load_checkpoint
from diffusion_ext.cli import main
from diffusion_ext.data import build_dataset
from diffusion_ext.demo import fused_available
from diffusion_ext.metrics import KEYS, depth_metrics
from diffusion_ext.train import load_trained

FUSED = fused_available(torch.device("cpu"))[0]
# every command on the CPU, also on a GPU host (these tests are about the command line), eager where a
# fused kernel is not built here
CPU = ["--device", "cpu"] + ([] if FUSED else ["--eager"])
SIZE = 8
TINY = ["--task", "depth", "--data", "builtin:depth-scenes", "--image-size", str(SIZE), "--data-size", "16",
        "--base-channels", "16", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-resolutions", "4",
        "--dropout", "0", "--head-dim", "16", "--num-groups", "4", "--num-timesteps", "100", "--batch-size", "4",
        "--lr", "1e-3", "--num-samples", "2", "--sample-steps", "2", "--beta-schedule", "cosine",
        "--prediction-type", "v_prediction", "--quiet"] + CPU


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("depth") / "run"
    rc = main(["train", *TINY, "--out", str(out), "--steps", "2", "--ckpt-every", "2"])
    assert rc == 0
    return out


def _png_size(path):
    with Image.open(path) as im:
        im.load()
        return im.size


def _write_png(path, h=12, w=10):
    g = torch.Generator().manual_seed(3)
    Image.fromarray(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()).save(path)
    return path


def test_train_depth_writes_a_conditional_unet(run_dir, capsys):
    ck = load_checkpoint(run_dir / "checkpoint.pt")
    assert ck["step"] == 2 and ck["config"]["task"] == "depth" and ck["model_kind"] == "unet"
    # RGB + noisy depth in, one depth channel out (the loss is on depth only)
    assert ck["model_config"]["in_channels"] == 4 and ck["model_config"]["out_channels"] == 1
    assert ck["model_config"]["attention_resolutions"] == [4]
    w, h = _png_size(run_dir / "samples" / "step_0000002.png")   # rows of image | ground truth | prediction
    assert w > h > 0
    assert (run_dir / "weights.pt").exists() and (run_dir / "loss.png").exists()


def test_predict_depth_writes_a_png_beside_the_input(run_dir, tmp_path, capsys):
    img = _write_png(tmp_path / "room.png")
    rc = main(["predict-depth", "--checkpoint", str(run_dir / "checkpoint.pt"), "--image", str(img),
               "--ensemble", "3", "--steps", "2", *CPU])
    assert rc == 0, capsys.readouterr().err
    assert "ensemble of 3" in capsys.readouterr().out
    out = tmp_path / "room_depth.png"
    assert _png_size(out) == (SIZE * 32, SIZE * 32)   # upscaled to 256 px to be seen
    with Image.open(out) as im:
        assert im.mode == "RGB"
    # DDPM (every step of the 100) from the exported weights, to an explicit path
    other = tmp_path / "sub_depth.png"
    rc = main(["predict-depth", "--checkpoint", str(run_dir / "weights.pt"), "--image", str(img), "--sampler", "ddpm",
               "--out", str(other), *CPU])
    assert rc == 0, capsys.readouterr().err
    assert other.exists()
    rc = main(["predict-depth", "--checkpoint", str(run_dir / "weights.pt"), "--image", str(img), "--sampler",
               "dpmpp_2m", "--steps", "3", "--out", str(tmp_path / "dpm_depth.png"), *CPU])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "dpm_depth.png").exists()


def test_ensemble_is_the_per_pixel_median_of_its_samples(run_dir):
    m = load_trained(str(run_dir / "checkpoint.pt"), fused=FUSED)
    ds = build_dataset("builtin:depth-scenes", image_size=SIZE, split="test", size=2)
    img = torch.stack([ds[0]["image"], ds[1]["image"]])
    k = 3
    got = depth_tools.predict(m, img, ensemble=k, steps=2, seed=4)
    # the K samples: one batch of K·B rows, sample j of image b at row j·B + b, from the same seed
    x = m.diffusion.sample(m.model, (k * 2, 1, SIZE, SIZE), cond=img.repeat(k, 1, 1, 1), steps=2, seed=4)
    samples = (x.clamp(-1, 1) + 1) * 5.0
    want = samples.view(k, 2, 1, SIZE, SIZE).sort(dim=0).values[1]   # the middle of 3
    torch.testing.assert_close(got, want)
    assert not torch.equal(samples[0:2], samples[2:4])                # the samples do differ


def test_eval_depth_table_files_and_numbers(run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval-depth", "--checkpoint", str(run_dir / "checkpoint.pt"), "--data", "builtin:depth-scenes",
               "--data-size", "3", "--steps", "2", "--out", str(out), *CPU])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    for label in ("δ1 ↑", "δ2 ↑", "δ3 ↑", "REL ↓", "SqRel ↓", "RMS ↓", "RMSlog ↓", "log10 ↓"):
        assert label in printed
    rec = json.loads((out / "eval_depth.json").read_text())
    assert set(rec["metrics"]) == set(KEYS) and rec["num_images"] == 3 and rec["split"] == "test"
    assert (out / "eval_depth.md").read_text() in printed
    # image | ground truth | prediction: 3 rows of 3 tiles of SIZE px (+2 px padding), scaled for viewing
    w, h = _png_size(out / "eval_depth.png")
    assert w == h and w % (2 + 3 * (SIZE + 2)) == 0
    # the numbers are depth_metrics of the predictions (one batch: seed 0) on the held-out split
    m = load_trained(str(run_dir / "checkpoint.pt"), fused=FUSED)
    ds = build_dataset("builtin:depth-scenes", image_size=SIZE, split="test", size=3)
    b = torch.utils.data.default_collate([ds[i] for i in range(3)])
    pred = depth_tools.predict(m, b["image"], steps=2, seed=0)
    want = depth_metrics(pred, b["depth_m"], b["valid"])
    for k in KEYS:
        assert rec["metrics"][k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
    assert 0 <= want["d1"] <= want["d2"] <= want["d3"] <= 1


def test_eval_depth_options_are_applied(run_dir, tmp_path, capsys):
    base = ["eval-depth", "--checkpoint", str(run_dir / "checkpoint.pt"), "--data", "builtin:depth-scenes",
            "--data-size", "3", "--steps", "2", *CPU]
    results = {}
    for name, extra in {"plain": [], "aligned": ["--align", "scale_shift", "--pooled", "--eigen-crop"]}.items():
        assert main(base + ["--out", str(tmp_path / name)] + extra) == 0, capsys.readouterr().err
        results[name] = json.loads((tmp_path / name / "eval_depth.json").read_text())
    a = results["aligned"]
    assert a["align"] == "scale_shift" and a["pooled"] and a["eigen_crop"]
    m = load_trained(str(run_dir / "checkpoint.pt"), fused=FUSED)
    ds = build_dataset("builtin:depth-scenes", image_size=SIZE, split="test", size=3)
    b = torch.utils.data.default_collate([ds[i] for i in range(3)])
    pred = depth_tools.predict(m, b["image"], steps=2, seed=0)
    want = depth_metrics(pred, b["depth_m"], b["valid"], align="scale_shift", pooled=True, eigen_crop=True)
    assert a["metrics"]["rms"] == pytest.approx(want["rms"], rel=1e-6)
    assert a["metrics"]["rms"] != pytest.approx(results["plain"]["metrics"]["rms"])


def test_eval_depth_on_nyu_csv_folder_and_mat(run_dir, tmp_path, capsys):
    nyu = pytest.importorskip("test_nyu")   # its tiny-file writers (skips without Pillow/h5py)
    folder = nyu.make_csv_folder(tmp_path / "csv")
    mat = nyu.make_mat(tmp_path / "nyu.mat", N=10)
    for name, data in (("csv", folder), ("mat", mat)):
        out = tmp_path / f"eval_{name}"
        rc = main(["eval-depth", "--checkpoint", str(run_dir / "checkpoint.pt"), "--data", str(data), "--steps", "2",
                   "--eigen-crop", "--out", str(out), *CPU])
        assert rc == 0, capsys.readouterr().err
        rec = json.loads((out / "eval_depth.json").read_text())
        n = len(build_dataset(str(data), image_size=SIZE, split="test"))
        assert rec["num_images"] == n >= 2 and rec["eigen_crop"], name
        assert all(rec["metrics"][k] == rec["metrics"][k] for k in KEYS), name   # no NaN
        assert (out / "eval_depth.png").exists()


def test_clear_errors(run_dir, tmp_path, capsys):
    ck = str(run_dir / "checkpoint.pt")
    img = _write_png(tmp_path / "a.png")
    assert main(["predict-depth", "--checkpoint", ck, "--image", str(img), "--ensemble", "0", *CPU]) == 2
    assert "--ensemble must be at least 1" in capsys.readouterr().err
    assert main(["predict-depth", "--checkpoint", ck, "--image", str(tmp_path / "missing.png"), *CPU]) == 2
    assert "cannot read --image" in capsys.readouterr().err
    assert main(["eval-depth", "--checkpoint", ck, "--data", "builtin:shapes", "--data-size", "2", *CPU]) == 2
    assert "is not a depth data set" in capsys.readouterr().err
    pixel = tmp_path / "pixel"
    assert main(["train", *[a if a != "depth" else "pixel" for a in TINY], "--data", "builtin:shapes",
                 "--out", str(pixel), "--steps", "1"]) == 0
    capsys.readouterr()
    for cmd in (["predict-depth", "--image", str(img)], ["eval-depth", "--data", "builtin:depth-scenes"]):
        assert main([cmd[0], "--checkpoint", str(pixel / "checkpoint.pt"), *cmd[1:], *CPU]) == 2
        assert "is a pixel model, not a depth model" in capsys.readouterr().err
    assert main(["train", *TINY[2:], "--task", "depth", "--data", "builtin:shapes", "--out", str(tmp_path / "r")]) == 2
    assert "the task needs a 'depth' one" in capsys.readouterr().err


def test_depth_runs_resume_exactly_and_accumulate(tmp_path):
    # the trainer's features on the depth task: exact --resume, gradient accumulation with channels_last
    def losses(out):
        return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = [*TINY, "--steps", "3", "--num-samples", "1", "--dropout", "0.1"]
    assert main(["train", *common, "--out", str(a)]) == 0
    assert main(["train", *TINY, "--steps", "2", "--num-samples", "1", "--dropout", "0.1", "--out", str(b)]) == 0
    assert main(["train", "--resume", "--out", str(b), "--steps", "3", "--quiet"]) == 0
    assert losses(a) == losses(b) and len(losses(a)) == 3
    pa, pb = load_checkpoint(a / "checkpoint.pt")["model"], load_checkpoint(b / "checkpoint.pt")["model"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert main(["train", *TINY, "--steps", "3", "--num-samples", "1", "--grad-accum", "2", "--channels-last",
                 "--out", str(c)]) == 0
    plain = tmp_path / "plain"
    assert main(["train", *TINY, "--steps", "3", "--num-samples", "1", "--out", str(plain)]) == 0
    assert losses(c) == pytest.approx(losses(plain), rel=1e-4, abs=1e-6)
