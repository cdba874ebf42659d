"""Checkpoints: atomic writes, loading without pickle code, clear errors for truncated and foreign files,
safetensors export and import, and the EMA's warm-up arithmetic."""
import os
import pickle

import pytest
import torch

from diffusion_ext import checkpoint as ck
from diffusion_ext.ema import EMA, ema_decay
from diffusion_ext.train import rng_state, set_rng_state


def _state(step=3):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"step": step, "model": model.state_dict(), "ema": {"decay": 0.9, "warmup": True, "num_updates": step,
                                                               "module": model.state_dict()},
            "optimizer": opt.state_dict(), "scaler": None, "rng": [rng_state()],
            "config": {"task": "pixel", "adam_betas": (0.9, 0.999), "channel_mults": (1, 2)},
            "model_kind": "unet", "model_config": {"in_channels": 3}}


def test_roundtrip_loads_with_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    st = _state()
    ck.save_checkpoint(path, st)
    # the file is readable by plain torch.load(weights_only=True): no pickle code runs
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == ck.CHECKPOINT_FORMAT and raw["step"] == 3
    got = ck.load_checkpoint(path)
    for k, v in st["model"].items():
        assert torch.equal(got["model"][k], v)
    assert got["optimizer"]["state"][0]["exp_avg"].equal(st["optimizer"]["state"][0]["exp_avg"])
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # the mode open() gives, not mkstemp's 0600


def test_rng_state_roundtrip(tmp_path):
    import random

    import numpy as np

    path = tmp_path / "c.pt"
    st = _state()
    ck.save_checkpoint(path, st)
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(ck.load_checkpoint(path)["rng"][0])
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_crash_between_temp_write_and_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ck.save_checkpoint(path, _state(step=1))

    def crash(src, dst):
        raise KeyboardInterrupt("simulated crash before the rename")

    monkeypatch.setattr(ck.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, _state(step=2))
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["step"] == 1  # the old checkpoint is intact
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # and the temporary file is gone


def test_torn_temp_file_never_replaces_target(tmp_path, monkeypatch):
    """A crash in the middle of writing (the write itself fails) leaves the old file."""
    path = tmp_path / "c.pt"
    ck.save_checkpoint(path, _state(step=1))

    def torn(f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ck.atomic_write(path, torn)
    assert ck.load_checkpoint(path)["step"] == 1


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_checkpoint_error(tmp_path, keep):
    path = tmp_path / "c.pt"
    ck.save_checkpoint(path, _state())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ck.CheckpointError, match=r"c\.pt.*(truncated|corrupt)"):
        ck.load_checkpoint(path)


def test_empty_and_missing_checkpoint_errors(tmp_path):
    with pytest.raises(ck.CheckpointError, match=r"nope\.pt: no such file"):
        ck.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match=r"e\.pt: the file is empty"):
        ck.load_checkpoint(tmp_path / "e.pt")
    (tmp_path / "t.pt").write_text("hello, not a checkpoint")
    with pytest.raises(ck.CheckpointError, match=r"t\.pt: cannot be read"):
        ck.load_checkpoint(tmp_path / "t.pt")


def test_foreign_checkpoint_error(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict(), "epoch": 3}, path)
    with pytest.raises(ck.CheckpointError, match=r"foreign\.pt: not a diffusion_ext file .*epoch, state_dict"):
        ck.load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(ck.CheckpointError, match="holds a list"):
        ck.load_checkpoint(path)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": ck.CHECKPOINT_FORMAT, "version": 1, "x": Evil()}, path)
    with pytest.raises(ck.CheckpointError, match=r"evil\.pt: it holds Python objects .*weights_only"):
        ck.load_checkpoint(path)
    path2 = tmp_path / "evil2.pt"
    with open(path2, "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(ck.CheckpointError, match=r"evil2\.pt"):
        ck.load_checkpoint(path2)


def test_version_mismatch(tmp_path):
    path = tmp_path / "v.pt"
    torch.save({**_state(), "format": ck.CHECKPOINT_FORMAT, "version": 99}, path)
    with pytest.raises(ck.CheckpointError, match="version 99"):
        ck.load_checkpoint(path)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_export_and_import_weights(tmp_path, fmt):
    sd = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5, dtype=torch.float64)}
    meta = {"task": "pixel", "model_kind": "unet", "model_config": {"channel_mults": [1, 2]}, "scale_factor": None}
    path = tmp_path / f"w.{fmt}"
    ck.export_weights(path, sd, meta, fmt)
    if fmt == "safetensors":
        from safetensors.torch import load_file

        assert set(load_file(path)) == set(sd)  # a plain safetensors file, readable by anyone
    got, got_meta = ck.load_weights(path)
    assert got_meta == meta
    for k, v in sd.items():
        assert torch.equal(got[k], v) and got[k].dtype == v.dtype
    info = ck.load_any(path)
    assert info["kind"] == "weights" and info["vae"] is None and set(info["weights"]) == set(sd)


def test_truncated_and_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    ck.export_weights(path, {"x": torch.randn(64, 64)}, {"task": "pixel"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match=r"w\.safetensors: a truncated or corrupt safetensors file"):
        ck.load_weights(path)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, other)
    with pytest.raises(ck.CheckpointError, match=r"other\.safetensors: .*not diffusion_ext weights"):
        ck.load_any(other)


# ----------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------
def test_ema_decay_schedule():
    assert ema_decay(0.9999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.9999, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.9, 100) == 0.9  # (1 + 100)/(10 + 100) = 0.918 > 0.9: capped
    assert ema_decay(0.9, 5, warmup=False) == 0.9


def test_ema_updates_by_hand():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert ema.update(model) == pytest.approx(2 / 11)
    # θ_ema = d·0 + (1 − d)·1 with d = 2/11
    assert ema.module.weight.item() == pytest.approx(9 / 11)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model)  # d = 3/12
    assert ema.module.weight.item() == pytest.approx(0.25 * 9 / 11 + 0.75 * 2)
    # without warm-up: θ_ema = 0.5·θ_ema + 0.5·θ
    ema2 = EMA(torch.nn.Linear(1, 1, bias=False).requires_grad_(False), decay=0.5, warmup=False)
    with torch.no_grad():
        ema2.module.weight.fill_(4.0)
    ema2.update(model)
    assert ema2.module.weight.item() == pytest.approx(3.0)
    # the state round-trips
    e3 = EMA(model, decay=0.1)
    e3.load_state_dict(ema.state_dict())
    assert e3.num_updates == 2 and e3.module.weight.item() == ema.module.weight.item()


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match="EMA: decay = 1.5"):
        EMA(torch.nn.Linear(1, 1), decay=1.5)
