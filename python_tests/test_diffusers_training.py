"""`train --backbone diffusers` and `export --format diffusers`: the trainer trains a diffusers UNet2DModel
through the patch, with its EMA, precision, resumption and DDP; the export loads in diffusers alone.

- the backbone is UNet2DModel with the native U-Net's options (level widths, resnets per level, attention
  at the configured resolutions and in the mid-block, groups, head dim), patched (fused) or not (--eager),
  the two training alike to rounding;
- resuming reproduces the uninterrupted run exactly; 2 DDP ranks equal 1 process; bf16 autocast trains;
- the exported folder, read by DDPMPipeline / DDIMPipeline.from_pretrained in a process without
  diffusion_ext, holds the EMA weights and a scheduler with the training schedule's ᾱ, and samples.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DModel  # noqa: E402

from diffusion_ext import NoiseSchedule  # noqa: E402
from diffusion_ext.checkpoint import load_checkpoint  # noqa: E402
from diffusion_ext.cli import main as cli_main  # noqa: E402
from diffusion_ext.integrations import diffusers_backbone  # noqa: E402
from diffusion_ext.integrations.diffusers_attention import FusedAttnProcessor  # noqa: E402
from diffusion_ext.integrations.diffusers_resnet import RESNET_KIND  # noqa: E402
from diffusion_ext.logging_utils import read_jsonl  # noqa: E402
from diffusion_ext.train import TrainConfig, Trainer, load_trained, train  # noqa: E402
from test_train import _ddp_worker, _free_port  # noqa: E402  (test_train's 2-rank launcher)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tiny models: see conftest.py


def tiny(out, **kw) -> TrainConfig:
    """test_train.tiny's sizes with attention at 4×4 (and in the mid-block): a step takes tens of ms."""
    base = dict(task="pixel", data="builtin:shapes", out=str(out), image_size=8, data_size=40, base_channels=16,
                channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, head_dim=16,
                num_groups=4, num_timesteps=100, steps=4, batch_size=8, lr=1e-3, ckpt_every=2, sample_every=0,
                num_samples=2, sample_steps=3, quiet=True, ema_decay=0.9, backbone="diffusers")
    base.update(kw)
    return TrainConfig(**base)


def losses(out):
    return [r["loss"] for r in read_jsonl(os.path.join(out, "log.jsonl")) if "loss" in r]


def test_backbone_is_a_unet2dmodel_with_the_native_options():
    cfg = diffusers_backbone.unet2d_config(image_size=64, in_channels=3, out_channels=3, base_channels=64,
                                           channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
                                           dropout=0.1, head_dim=32, num_groups=32, num_classes=10)
    assert cfg == diffusers_backbone.REPORT_64 | {"num_class_embeds": 11}
    assert cfg["down_block_types"] == ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    assert cfg["up_block_types"] == ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]
    m = diffusers_backbone.DiffusersUNet(diffusers_backbone.unet2d_config(
        image_size=8, in_channels=3, out_channels=3, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
        attention_resolutions=(4,), dropout=0.0, head_dim=16, num_groups=4, num_classes=3), 3)
    assert all(k.startswith("unet.") for k in m.state_dict())
    assert m.patch_report.counts()[RESNET_KIND] == 2 * 1 + 2 * 2 + 2  # 2 levels: 1 down, 2 up each; 2 mid
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 50])
    with torch.no_grad():  # y=None is the null class, index num_classes
        torch.testing.assert_close(m(x, t), m.unet(x, t, class_labels=torch.tensor([3, 3])).sample)


def test_train_backbone_diffusers_fused_and_eager_train_alike(tmp_path):
    a = train(tiny(tmp_path / "fused"), log=lambda *x: None)
    train(tiny(tmp_path / "eager", fused=False), log=lambda *x: None)
    la, lb = losses(tmp_path / "fused"), losses(tmp_path / "eager")
    assert len(la) == 4 and la == pytest.approx(lb, rel=1e-4, abs=1e-6)
    ck = load_checkpoint(tmp_path / "fused" / "checkpoint.pt")
    assert ck["model_kind"] == diffusers_backbone.KIND and ck["config"]["backbone"] == "diffusers"
    assert all(k.startswith("unet.") for k in ck["model"]) and ck["ema"]["num_updates"] == 4
    assert os.path.exists(a["samples"]) and os.path.exists(a["weights"])
    m = load_trained(a["weights"])  # the sampler's path: the EMA model, patched
    assert isinstance(m.model.unet.mid_block.attentions[0].processor, FusedAttnProcessor)


def test_train_backbone_diffusers_resumes_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny(a), log=lambda *x: None)
    train(tiny(b, steps=2), log=lambda *x: None)
    train(tiny(b), resume=True, log=lambda *x: None)
    assert losses(a) == losses(b)
    pa, pb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    for k in pa["model"]:
        assert torch.equal(pa["model"][k], pb["model"][k]), k
        assert torch.equal(pa["ema"]["module"][k], pb["ema"]["module"][k]), k


def test_train_backbone_diffusers_under_bf16_autocast(tmp_path):
    train(tiny(tmp_path, precision="bf16", steps=2), log=lambda *x: None)
    assert all(torch.isfinite(torch.tensor(losses(tmp_path))))


def test_train_backbone_diffusers_two_ddp_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    one, two = tmp_path / "one", tmp_path / "two"
    mp.spawn(_ddp_worker, args=(2, _free_port(), tiny(two, steps=2)), nprocs=2, join=True)
    train(tiny(one, steps=2), log=lambda *x: None)
    assert load_checkpoint(two / "checkpoint.pt")["world_size"] == 2
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    g1, g2 = ([r["grad_norm"] for r in read_jsonl(d / "log.jsonl") if "loss" in r] for d in (one, two))
    assert g2 == pytest.approx(g1, rel=1e-5)
    # Adam moves every element by about lr·sign(g) whatever |g|, so an element whose gradient is rounding
    # noise (a key bias, whose exact gradient is 0; a weight that happens to get ~0) can differ by up to lr
    # per step between two summation orders; the rest agree far below that
    p1, p2 = load_checkpoint(one / "checkpoint.pt")["model"], load_checkpoint(two / "checkpoint.pt")["model"]
    lr = tiny(one).lr
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=0, atol=2 * 2 * lr, msg=lambda m, k=k: f"{k}: {m}")
        apart = int(((p2[k] - p1[k]).abs() > 1e-5).sum())
        assert apart <= max(2, p1[k].numel() // 100) or k.endswith("to_k.bias"), f"{k}: {apart} elements differ"


def test_backbone_diffusers_is_for_the_pixel_task():
    with pytest.raises(ValueError, match="backbone 'diffusers' trains the pixel task"):
        tiny("unused", task="vae").validate()
    with pytest.raises(ValueError, match="backbone 'keras' is unknown"):
        tiny("unused", backbone="keras").validate()


_LOAD_EXPORT = r"""
import json, sys, torch
from diffusers import DDIMPipeline, DDPMPipeline
out = sys.argv[1]
ddpm, ddim = DDPMPipeline.from_pretrained(out), DDIMPipeline.from_pretrained(out)
x, t = torch.load(out + "/../x.pt"), torch.tensor([7, 93])
with torch.no_grad():
    torch.save({"eps": ddpm.unet(x, t).sample, "alphas_cumprod": ddpm.scheduler.alphas_cumprod,
                "ddim_scheduler": type(ddim.scheduler).__name__, "ddim_config": dict(ddim.scheduler.config),
                "ddpm_images": ddpm(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                                    output_type="pt").images,
                "ddim_images": ddim(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                                    output_type="pt").images}, out + "/../loaded.pt")
assert not any(m.startswith("diffusion_ext") for m in sys.modules), "diffusion_ext was imported"
"""


def test_export_format_diffusers_loads_in_plain_diffusers(tmp_path, capsys):
    """The EMA weights and the training schedule (cosine, v-prediction), read by DDPMPipeline and DDIMPipeline
    in a process that never imports diffusion_ext: the same ε̂ as the trainer's EMA model, the same ᾱ as its
    NoiseSchedule, and both pipelines sample."""
    run = train(tiny(tmp_path / "run", steps=2, beta_schedule="cosine", prediction_type="v_prediction"),
                log=lambda *x: None)
    out = tmp_path / "export"
    assert cli_main(["export", "--checkpoint", run["checkpoint"], "--format", "diffusers", str(out)]) == 0
    assert "DDPMPipeline" in capsys.readouterr().out
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", _LOAD_EXPORT, str(out)], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = torch.load(tmp_path / "loaded.pt")
    ema = load_trained(run["checkpoint"])
    with torch.no_grad():
        torch.testing.assert_close(loaded["eps"], ema.model(x, torch.tensor([7, 93])), rtol=1e-4, atol=1e-5)
    ours = NoiseSchedule(100, "cosine").alphas_cumprod
    torch.testing.assert_close(loaded["alphas_cumprod"].double(), ours, rtol=2e-6, atol=1e-7)
    assert loaded["ddim_scheduler"] == "DDIMScheduler" and loaded["ddim_config"]["prediction_type"] == "v_prediction"
    assert loaded["ddim_config"]["set_alpha_to_one"] and loaded["ddim_config"]["clip_sample"]
    for k in ("ddpm_images", "ddim_images"):
        assert loaded[k].shape == (2, 3, 8, 8) and torch.isfinite(loaded[k]).all()


def test_export_errors_name_the_command_and_what_was_expected(tmp_path, capsys):
    ck = tmp_path / "native" / "checkpoint.pt"
    train(tiny(tmp_path / "native", backbone="native", steps=1, attention_resolutions=()), log=lambda *x: None)
    assert cli_main(["export", "--checkpoint", str(ck), "--format", "diffusers", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "diffusion_ext export:" in err and "'unet' model" in err and "--backbone diffusers" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    run = train(tiny(tmp_path / "d", steps=1), log=lambda *x: None)
    assert cli_main(["export", "--checkpoint", run["checkpoint"], "--format", "diffusers", str(busy)]) == 2
    assert "is not empty and holds no model_index.json" in capsys.readouterr().err
    assert not (busy / "unet").exists()


def test_trainer_builds_the_backbone_the_config_names(tmp_path):
    t = Trainer(tiny(tmp_path, steps=1))
    try:
        assert isinstance(t.model.unet, UNet2DModel) and t.model_kind == diffusers_backbone.KIND
        assert t.model_config["unet"]["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"]
    finally:
        t.close()
