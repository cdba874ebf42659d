"""The trainer: exact resumption on CPU, DDP (gloo, 2 processes) == 1 process, layout-invariant data,
timesteps and noise, gradient accumulation.

Every run here is pinned to the CPU (tiny(..., device="cpu")): on a GPU host the trainer's default device
would be CUDA, in bf16, where neither exact resumption nor the DDP equalities hold to these tolerances,
and the 2-rank gloo test would ask for cuda:1. The CUDA runs are the gpu-marked tests at the end, with
tolerances for bf16, TF32 and cuDNN's non-deterministic kernels."""
import dataclasses
import os
import socket

import pytest
import torch

from diffusion_ext.checkpoint import load_checkpoint
from diffusion_ext.demo import fused_available
from diffusion_ext.logging_utils import read_jsonl
from diffusion_ext.train import (Layout, SampleStream, TrainConfig, Trainer, build_diffusion, diffusion_loss,
                                 step_randomness, train)

# The fused model where every kernel it needs is built here, else the eager one (same parameters).
FUSED = fused_available(torch.device("cpu"))[0]


def tiny(out, **kw) -> TrainConfig:
    base = dict(task="pixel", data="builtin:shapes", out=str(out), image_size=8, data_size=40, base_channels=16,
                channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), dropout=0.0, head_dim=16,
                num_groups=4, num_timesteps=100, steps=6, batch_size=8, lr=1e-3, ckpt_every=3, sample_every=0,
                num_samples=4, sample_steps=3, quiet=True, fused=FUSED, ema_decay=0.9, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def losses(out):
    return [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(out, "log.jsonl")) if "loss" in r]


def params(out):
    return load_checkpoint(os.path.join(out, "checkpoint.pt"))["model"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    # dropout on: the resumed run must also restore torch's generator
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny(a, dropout=0.1), log=lambda *x: None)
    train(tiny(b, dropout=0.1, steps=3), log=lambda *x: None)
    assert load_checkpoint(b / "checkpoint.pt")["step"] == 3
    summary = train(tiny(b, dropout=0.1, steps=6), resume=True, log=lambda *x: None)
    assert summary["resumed_from"] == 3 and summary["step"] == 6
    la, lb = losses(a), losses(b)
    assert [s for s, _ in la] == [1, 2, 3, 4, 5, 6] and la == lb  # exactly the same trajectory
    pa, pb = params(a), params(b)
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    ea = load_checkpoint(a / "checkpoint.pt")["ema"]
    eb = load_checkpoint(b / "checkpoint.pt")["ema"]
    assert ea["num_updates"] == eb["num_updates"] == 6
    for k in ea["module"]:
        assert torch.equal(ea["module"][k], eb["module"][k]), k


def test_cosine_lr_decay_and_min_snr_weighting_are_used_and_resume_exactly(tmp_path):
    import math

    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(lr_warmup=2, lr_decay="cosine", snr_gamma=5.0)
    train(tiny(a, **kw), log=lambda *x: None)
    train(tiny(b, steps=3, **kw), log=lambda *x: None)
    train(tiny(b, steps=6, **kw), resume=True, log=lambda *x: None)
    # warm-up 1e-3·(s+1)/2, then 1e-3·½(1 + cos(π·(s − 2)/4)) for optimizer steps s = 0..5
    lrs = [r["lr"] for r in read_jsonl(os.path.join(a, "log.jsonl")) if "lr" in r]
    expected = [5e-4, 1e-3] + [1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(2, 6)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert losses(a) == losses(b)
    # the weighting reaches the loss: the first step's loss (same weights, data and noise) differs from L_simple's
    assert build_diffusion(tiny(a, **kw).to_dict(), "cpu").snr_gamma == 5.0
    c = tmp_path / "c"
    train(tiny(c, steps=1, lr_warmup=2, lr_decay="cosine"), log=lambda *x: None)
    assert losses(c)[0][1] != pytest.approx(losses(a)[0][1], rel=1e-3)
    for k, v in params(a).items():
        assert torch.equal(v, params(b)[k]), k
    with pytest.raises(ValueError, match="TrainConfig: lr_decay 'step' is unknown"):
        tiny(a, lr_decay="step").validate()


def test_resume_refuses_a_changed_configuration(tmp_path):
    train(tiny(tmp_path, steps=3), log=lambda *x: None)
    with pytest.raises(ValueError, match=r"trained with another configuration: lr: 0\.001 in the checkpoint, "
                                         r"0\.5 given\. A resumed run keeps"):
        Trainer(tiny(tmp_path), resume=True, overrides={"lr": 0.5, "steps": 6})
    # what only changes the run's length, bookkeeping or place is not a difference
    said = []
    Trainer(tiny(tmp_path), resume=True, overrides={"steps": 6, "device": "cpu", "out": "elsewhere/", "lr": 1e-3},
            log=said.append).close()
    assert said[0].startswith(f"resuming {tmp_path} at step 3 of 6 (checkpoint written ")


def test_data_order_is_an_even_split_of_the_global_batch():
    stream = SampleStream(10, seed=3)
    epoch0 = stream.indices(0, 10)
    assert sorted(epoch0) == list(range(10)) and sorted(stream.indices(10, 10)) == list(range(10))
    assert epoch0 != stream.indices(10, 10)  # a new permutation each epoch
    cfg = tiny("unused", batch_size=8, grad_accum=2)
    full = Layout(8, 1, 1, 0)
    for step in range(3):
        for m in range(2):
            one = Layout(8, 2, 1, 0)
            ranks = [Layout(8, 2, 2, r) for r in range(2)]
            whole = stream.indices(one.first_position(step, m), one.local)
            parts = [stream.indices(L.first_position(step, m), L.local) for L in ranks]
            assert parts[0] + parts[1] == whole
            t1, d1 = step_randomness(cfg, one, step, m, 100)
            t2 = [step_randomness(cfg, L, step, m, 100) for L in ranks]
            assert torch.equal(torch.cat([t2[0][0], t2[1][0]]), t1)
            assert torch.equal(torch.cat([t2[0][1], t2[1][1]]), d1)
        # and the two micro-batches of one step together are the step's batch without accumulation
        ts = [step_randomness(cfg, Layout(8, 2, 1, 0), step, m, 100)[0] for m in range(2)]
        assert torch.equal(torch.cat(ts), step_randomness(cfg, full, step, 0, 100)[0])


def test_noise_does_not_depend_on_the_batch_split():
    """diffusion_loss over a batch = mean of its losses over any split (same per-sample noise)."""
    torch.manual_seed(0)
    diff = build_diffusion(dataclasses.asdict(tiny("x")), "cpu")
    seen = []

    def model(x, t):
        seen.append(x.clone())
        return x * 0.5

    x0 = torch.rand(6, 3, 8, 8) * 2 - 1
    t = torch.randint(0, 100, (6,))
    whole = diffusion_loss(diff, model, x0, t, 10, noise_seed=7)
    a = diffusion_loss(diff, model, x0[:2], t[:2], 10, noise_seed=7)
    b = diffusion_loss(diff, model, x0[2:], t[2:], 12, noise_seed=7)
    torch.testing.assert_close(whole, (2 * a + 4 * b) / 6)
    torch.testing.assert_close(seen[0], torch.cat([seen[1], seen[2]]))


def test_grad_accumulation_matches_the_full_batch(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny(a, steps=3), log=lambda *x: None)
    train(tiny(b, steps=3, grad_accum=2), log=lambda *x: None)
    for (sa, la), (sb, lb) in zip(losses(a), losses(b)):
        assert sa == sb and la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    pa, pb = params(a), params(b)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(cfg, log=lambda *x: None)


def test_ddp_two_processes_equal_one(tmp_path):
    """torch.distributed with gloo: 2 processes × 4 samples == 1 process × 8 (parameters after 3 steps)."""
    import torch.multiprocessing as mp

    one, two = tmp_path / "one", tmp_path / "two"
    cfg2 = tiny(two, steps=3)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg2), nprocs=2, join=True)
    train(tiny(one, steps=3), log=lambda *x: None)
    ck2 = load_checkpoint(two / "checkpoint.pt")
    assert ck2["world_size"] == 2 and len(ck2["rng"]) == 2  # every rank's generator state is kept
    l1, l2 = losses(one), losses(two)
    assert [s for s, _ in l1] == [s for s, _ in l2] == [1, 2, 3]
    for (_, a), (_, b) in zip(l1, l2):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    p1, p2 = params(one), ck2["model"]
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-4, atol=1e-5)


class FakeDepth(torch.utils.data.Dataset):
    """A stand-in depth data set (kind "depth"): depth is a ramp whose slope depends on the image."""
    kind, num_classes = "depth", None

    def __init__(self, n=16, size=8):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        ramp = torch.linspace(-1, 1, size).view(1, 1, size).expand(1, size, size)
        self.depth = torch.stack([ramp * self.images[i, 0].mean() for i in range(n)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        d = self.depth[i]
        return {"image": self.images[i], "depth": d, "depth_m": (d + 1) * 5, "valid": torch.ones_like(d, dtype=torch.bool)}


def test_load_trained_samples_in_channels_last_on_a_cpu_as_in_nchw(tmp_path):
    """load_trained's "auto" layout is channels_last on a CPU (faster there); the samples are those of the
    contiguous model up to rounding, and a bad memory_format is a clear error."""
    from diffusion_ext.train import load_trained

    train(tiny(tmp_path, steps=3), log=lambda *x: None)
    ckpt = str(tmp_path / "checkpoint.pt")
    auto, nchw = load_trained(ckpt, fused=FUSED), load_trained(ckpt, fused=FUSED, memory_format="contiguous")
    convs = [(m_a.weight, m_b.weight) for m_a, m_b in zip(auto.model.modules(), nchw.model.modules())
             if isinstance(m_a, torch.nn.Conv2d)]
    assert convs and all(a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
                         and b.is_contiguous() for a, b in convs if a.shape[-1] > 1)
    xa = auto.diffusion.sample(auto.model, (3, 3, 8, 8), steps=4, seed=2)
    xb = nchw.diffusion.sample(nchw.model, (3, 3, 8, 8), steps=4, seed=2)
    assert xa.is_contiguous() and xb.std() > 0.05
    torch.testing.assert_close(xa, xb, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="load_trained: memory_format 'nhwc' is unknown"):
        load_trained(ckpt, memory_format="nhwc")


def test_depth_task_trains_and_predicts(tmp_path, monkeypatch):
    from diffusion_ext import depth_tools, train as train_mod
    from diffusion_ext.train import load_trained

    monkeypatch.setattr(train_mod, "build_dataset_for", lambda cfg, split="train": FakeDepth())
    summary = train(tiny(tmp_path, task="depth", data="fake-depth", steps=2), log=lambda *x: None)
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["model_config"]["in_channels"] == 4 and ck["model_config"]["out_channels"] == 1
    assert "depth_mse" in summary and (tmp_path / "samples" / "step_0000002.png").exists()
    m = load_trained(str(tmp_path / "checkpoint.pt"), fused=FUSED)
    depth = depth_tools.predict(m, FakeDepth().images[:2], ensemble=3, steps=2)
    assert depth.shape == (2, 1, 8, 8) and torch.isfinite(depth).all() and (depth >= 0).all()
    one = depth_tools.predict(m, FakeDepth().images[:2], ensemble=1, steps=2)
    assert one.shape == (2, 1, 8, 8)


def test_latent_task_uses_the_vae_and_its_scale(tmp_path):
    from diffusion_ext.train import load_trained

    vae_dir, lat_dir = tmp_path / "vae", tmp_path / "latent"
    train(tiny(vae_dir, task="vae", channel_mults=(1,), steps=2), log=lambda *x: None)
    train(tiny(lat_dir, task="latent", vae=str(vae_dir / "checkpoint.pt"), channel_mults=(1, 2), base_channels=16,
               steps=2, scale_batches=2), log=lambda *x: None)
    ck = load_checkpoint(lat_dir / "checkpoint.pt")
    assert ck["scale_factor"] > 0 and ck["vae"]["config"]["latent_channels"] == 4
    assert ck["model_config"]["image_size"] == 4 and ck["model_config"]["in_channels"] == 4
    m = load_trained(str(lat_dir / "weights.pt"), fused=FUSED)  # exported weights carry the VAE too
    assert m.latent is not None and m.latent.scale_factor == ck["scale_factor"]
    images = m.latent.sample(m.model, 2, steps=2, seed=0)
    assert images.shape == (2, 3, 8, 8)
    with pytest.raises(Exception, match="--vae needs a checkpoint of --task vae"):
        train(tiny(tmp_path / "bad", task="latent", vae=str(lat_dir / "checkpoint.pt")), log=lambda *x: None)


def test_bf16_autocast_trains_the_fused_model_like_fp32(tmp_path):
    """--precision bf16 (autocast; the default on a bf16 GPU) with the fused kernels: the run completes,
    samples, and its losses follow the fp32 run's to bf16 accuracy."""
    kw = dict(steps=3, attention_resolutions=(4,))  # group norm and attention both under autocast
    train(tiny(tmp_path / "fp32", **kw), log=lambda *x: None)
    train(tiny(tmp_path / "bf16", precision="bf16", **kw), log=lambda *x: None)
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    for (_, la), (_, lb) in zip(a, b):
        assert lb == pytest.approx(la, rel=0.05)
    assert os.listdir(tmp_path / "bf16" / "samples")


def test_bf16_on_a_cpu_without_native_bf16_warns_and_runs_as_asked(tmp_path, monkeypatch):
    """--precision bf16 on a CPU that would emulate it: a warning that says so and what to pick instead;
    none where the CPU has native bf16 (the flag parsed from a cpuinfo file) or on auto/fp32."""
    import warnings

    from diffusion_ext import cpu_features, train as train_mod

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma f16c\n")
    assert not cpu_features.native_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_features.native_bf16(str(info))
    assert not cpu_features.native_bf16(str(tmp_path / "missing"))

    cpu = torch.device("cpu")
    monkeypatch.setattr(train_mod, "native_bf16", lambda: False)
    with pytest.warns(UserWarning, match=r"--precision bf16 on a CPU without native bf16.*--precision fp32"):
        assert train_mod.resolve_precision("bf16", cpu) is torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train_mod.resolve_precision("auto", cpu) is None
        assert train_mod.resolve_precision("fp32", cpu) is None
        monkeypatch.setattr(train_mod, "native_bf16", lambda: True)
        assert train_mod.resolve_precision("bf16", cpu) is torch.bfloat16


def _failing_setup_worker(rank: int, world: int, port: int, cfg: TrainConfig) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match="not divisible by the 2 processes"):
        Trainer(cfg, log=lambda *x: None)
    assert not dist.is_initialized(), "a failed Trainer set-up must tear its process group down"


def test_failed_setup_tears_the_process_group_down(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_failing_setup_worker, args=(2, _free_port(), tiny(tmp_path, batch_size=7)), nprocs=2, join=True)


# ---------------------------------------------------------------------------------------------------------
# on a GPU (skipped without one): the same trainer on CUDA, with tolerances for TF32 convolutions (on by
# default in cuDNN), bf16 autocast and cuDNN's non-deterministic backward kernels; never a second GPU
# ---------------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp32_training_follows_the_cpu_run(tmp_path):
    train(tiny(tmp_path / "cpu", steps=3), log=lambda *x: None)
    train(tiny(tmp_path / "cuda", steps=3, device="cuda", precision="fp32"), log=lambda *x: None)
    a, b = losses(tmp_path / "cpu"), losses(tmp_path / "cuda")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    for (_, la), (_, lb) in zip(a, b):   # the same data, timesteps and Philox noise; TF32 rounding only
        assert lb == pytest.approx(la, rel=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_run_resumes_close_to_the_uninterrupted_run(tmp_path):
    """precision auto (bf16 on a bf16 GPU): a run stopped at step 2 and resumed follows the uninterrupted one
    to bf16 accuracy (not bit for bit: cuDNN and atomics reorder sums)."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny(a, steps=4, device="cuda"), log=lambda *x: None)
    train(tiny(b, steps=2, device="cuda"), log=lambda *x: None)
    summary = train(tiny(b, steps=4, device="cuda"), resume=True, log=lambda *x: None)
    assert summary["resumed_from"] == 2 and summary["step"] == 4
    la, lb = losses(a), losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb] == [1, 2, 3, 4]
    for (_, x), (_, y) in zip(la, lb):
        assert y == pytest.approx(x, rel=5e-2)
    assert load_checkpoint(b / "checkpoint.pt")["config"]["device"] == "cuda"
