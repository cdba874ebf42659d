"""`python -m diffusion_ext train | sample`: the files a run writes, sampling from a checkpoint or exported
weights, clear errors, and Ctrl-C (finish the step, save, exit 130; --resume continues).

Everything runs on the CPU (--device cpu), also on a GPU host: these tests are about the command line.
(Run folders, output paths and resuming from elsewhere: test_run_folders.py.)"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import cli_run
import diffusion_ext
from diffusion_ext.checkpoint import load_checkpoint
from diffusion_ext.cli import main
from diffusion_ext.logging_utils import read_jsonl

TINY = [*cli_run.TINY, "--quiet"]
SAMPLE = cli_run.CPU  # sample's options for the model TINY trains, on the CPU


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    rc = main(["train", *TINY, "--out", str(out), "--steps", "4", "--ckpt-every", "2", "--sample-every", "2",
               "--save-format", "safetensors", "--sample-sampler", "dpmpp_2m"])
    assert rc == 0
    return out


def _png(path):
    with Image.open(path) as im:
        im.load()
        return im.size


def test_train_writes_checkpoint_log_samples_and_curve(run_dir):
    ck = load_checkpoint(run_dir / "checkpoint.pt")
    assert ck["step"] == 4 and ck["config"]["task"] == "pixel" and ck["model_kind"] == "unet"
    assert ck["config"]["sample_sampler"] == "dpmpp_2m"  # the grids' sampler
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 4
    recs = read_jsonl(run_dir / "log.jsonl")
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    assert all(r["step_time"] > 0 and r["lr"] == 1e-3 for r in train_recs)
    assert [r["step"] for r in recs if r.get("event") == "samples"] == [2, 4]
    for s in (2, 4):
        w, h = _png(run_dir / "samples" / f"step_{s:07d}.png")
        assert w >= 64 and h >= 64
    assert _png(run_dir / "loss.png") == (640, 400)
    assert (run_dir / "weights.safetensors").exists() and (run_dir / "config.json").exists()


@pytest.mark.parametrize("source", ["checkpoint.pt", "weights.safetensors"])
def test_sample_writes_a_grid(run_dir, tmp_path, source, capsys):
    out = tmp_path / "grid.png"
    rc = main(["sample", "--checkpoint", str(run_dir / source), "--num", "4", "--steps", "3", "--out", str(out)]
              + SAMPLE)
    assert rc == 0, capsys.readouterr().err
    assert _png(out) == ((2 + 2 * (8 + 2)) * 8,) * 2  # a 2×2 grid of 8×8 images, upscaled 8× to be seen


@pytest.mark.parametrize("sampler, spacing", [("dpmpp_2m", None), ("dpmpp_2m_sde", None), ("ddpm", None),
                                              ("ddim", "trailing"), ("dpmpp_2m", "karras")])
def test_sample_takes_every_sampler(run_dir, tmp_path, sampler, spacing, capsys):
    from diffusion_ext.images import save_grid
    from diffusion_ext.train import load_trained

    out, expected = tmp_path / "grid.png", tmp_path / "expected.png"
    rc = main(["sample", "--checkpoint", str(run_dir / "checkpoint.pt"), "--num", "2", "--sampler", sampler,
               "--steps", "3", "--seed", "4", "--out", str(out)] + (["--spacing", spacing] if spacing else []) + SAMPLE)
    assert rc == 0, capsys.readouterr().err
    m = load_trained(str(run_dir / "checkpoint.pt"), fused=cli_run.FUSED)
    x = m.diffusion.sample(m.model, (2, 3, 8, 8), sampler=sampler, steps=3, seed=4, spacing=spacing)
    save_grid(x.float(), str(expected))
    assert out.read_bytes() == expected.read_bytes()


def test_sample_from_checkpoint_and_weights_agree(run_dir, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    main(["sample", "--checkpoint", str(run_dir / "checkpoint.pt"), "--num", "2", "--steps", "2", "--out", str(a)] + SAMPLE)
    main(["sample", "--checkpoint", str(run_dir / "weights.safetensors"), "--num", "2", "--steps", "2", "--out",
          str(b)] + SAMPLE)
    assert a.read_bytes() == b.read_bytes()  # the exported weights are the checkpoint's EMA weights


def test_clear_errors(tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    assert main(["sample", "--checkpoint", str(foreign), "--out", str(tmp_path / "x.png"), *SAMPLE]) == 2
    err = capsys.readouterr().err
    assert "foreign.pt" in err and "not a diffusion_ext file" in err
    assert main(["train", "--data", "builtin:shapes", "--out", str(tmp_path / "r")]) == 2
    assert "--task is required" in capsys.readouterr().err
    assert main(["train", "--task", "latent", "--data", "builtin:shapes", "--out", str(tmp_path / "r")]) == 2
    assert "needs vae" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "checkpoint.pt: no such file; " + str(tmp_path / "none") + " holds no run to continue" in \
        capsys.readouterr().err
    assert main(["train", "--task", "pixel", "--data", "builtin:shapes", "--precision", "fp16", "--device", "cpu",
                 "--out", str(tmp_path / "r")]) == 2
    assert "diffusion_ext train: --precision fp16 needs a CUDA device" in capsys.readouterr().err  # named once
    assert main(["train", "--task", "pixel", "--data", "builtin:shapes", "--snr-gamma", "0", "--device", "cpu",
                 "--out", str(tmp_path / "r")]) == 2
    assert "TrainConfig: snr_gamma = 0.0; expected None (L_simple) or a positive number" in capsys.readouterr().err


def test_sampler_errors(run_dir, tmp_path, capsys):
    from diffusion_ext.train import TrainConfig

    assert main(["sample", "--checkpoint", str(run_dir / "checkpoint.pt"), "--sampler", "dpmpp_2m", "--eta", "0.5",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "eta = 0.5 applies to the ddim sampler only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="TrainConfig: sample_sampler 'euler' is unknown"):
        TrainConfig(sample_sampler="euler").validate()


def test_ctrl_c_saves_and_resume_continues(tmp_path, capsys):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(diffusion_ext.__file__)),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "diffusion_ext", "train", *TINY, "--out", str(out),
                             "--steps", "100000", "--ckpt-every", "100000", "--sample-every", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(read_jsonl(log)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    # saved, then the exit status of a process ended by SIGINT, so a script can tell it from a finished run
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted after step" in stdout and f"--resume --out {out}" in stdout
    done = [r["step"] for r in read_jsonl(log) if "loss" in r]
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == done[-1] >= 2 and done == list(range(1, done[-1] + 1))  # no step lost
    # --resume picks up from there, keeping the configuration, and says so
    assert main(["train", "--resume", "--out", str(out), "--steps", str(done[-1] + 2)]) == 0
    assert f"resuming {out} at step {done[-1]} of {done[-1] + 2} (checkpoint written " in capsys.readouterr().out
    steps = [r["step"] for r in read_jsonl(log) if "loss" in r]
    assert steps == list(range(1, done[-1] + 3))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == done[-1] + 2
