"""Checkpoints: written atomically, read without running pickle code.

A training checkpoint is one torch.save'd dict of tensors and plain values (no classes), so that
torch.load(weights_only=True) reads it; `format` marks it as ours:

    {"format": "diffusion_ext.checkpoint", "version": 1, "step": int,
     "model": state_dict, "ema": {"decay", "warmup", "num_updates", "module": state_dict},
     "optimizer": state_dict, "scaler": state_dict | None, "rng": {...},
     "config": TrainConfig as a dict, "model_kind": "unet" | "vae", "model_config": dict,
     "scale_factor": float | None, "vae": {"path", "config", "state_dict"} | None, "num_classes": int | None}

Exported weights (the EMA model only, for sampling and sharing) are either the same kind of file with
format "diffusion_ext.weights", or a .safetensors file whose metadata holds the JSON of everything but
the tensors. Both load without pickle.

Atomic write: the file is written to a temporary name in the same directory, flushed and fsync'ed, then
os.replace'd over the target (atomic on POSIX and Windows), and the directory is fsync'ed: a crash at
any moment leaves either the old checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import tempfile

import torch

CHECKPOINT_FORMAT = "diffusion_ext.checkpoint"
WEIGHTS_FORMAT = "diffusion_ext.weights"
VERSION = 1
SAVE_FORMATS = ("pt", "safetensors")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, not ours, or from another version."""


# ----------------------------------------------------------------------------------------------------
# atomic write
# ----------------------------------------------------------------------------------------------------
def atomic_write(path: str, write) -> None:
    """Calls write(file_object) on a temporary file beside `path`, then renames it over `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some file systems (and Windows) do not fsync directories
        pass


def save_checkpoint(path: str, state: dict) -> None:
    """Writes a training checkpoint atomically (adds format and version)."""
    state = {"format": CHECKPOINT_FORMAT, "version": VERSION, **state}
    atomic_write(path, lambda f: torch.save(state, f))


# ----------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------
def _torch_load(path: str, map_location) -> object:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: is a directory, expected a checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path}: the file is empty (0 bytes)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "weights_only" in msg:
            raise CheckpointError(
                f"checkpoint {path}: it holds Python objects that loading with weights_only=True refuses to "
                f"unpickle (a diffusion_ext checkpoint holds only tensors and plain values); not loaded"
            ) from None
        raise CheckpointError(f"checkpoint {path}: not a readable torch file ({msg.splitlines()[0]})") from None
    except Exception as e:  # RuntimeError, EOFError, KeyError, ... from a torn or foreign byte stream
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path}: cannot be read ({size} bytes); it is truncated, corrupt or not a torch "
            f"checkpoint: {first}"
        ) from None


def _check_format(path: str, obj, expected: tuple[str, ...]) -> dict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(obj).__name__}, not a diffusion_ext checkpoint dict")
    fmt = obj.get("format")
    if fmt not in expected:
        keys = ", ".join(sorted(map(str, obj.keys()))[:8])
        raise CheckpointError(
            f"checkpoint {path}: not a diffusion_ext file (format = {fmt!r}, expected {' or '.join(expected)}; "
            f"its top-level keys are: {keys or 'none'})"
        )
    if obj.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: version {obj.get('version')!r}; this diffusion_ext reads version {VERSION}")
    return obj


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Reads a training checkpoint written by save_checkpoint (never runs pickle code)."""
    obj = _torch_load(os.fspath(path), map_location)
    obj = _check_format(path, obj, (CHECKPOINT_FORMAT,))
    missing = [k for k in ("step", "model", "ema", "optimizer", "config", "model_kind", "model_config") if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {path}: a training checkpoint, but it lacks {', '.join(missing)}")
    return obj


def _is_safetensors(path: str) -> bool:
    # safetensors: an 8-byte little-endian header length, then a JSON header starting with '{'
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def export_weights(path: str, state_dict: dict, meta: dict, fmt: str | None = None) -> None:
    """Writes the weights `state_dict` with `meta` (JSON-serialisable: task, model kind and config,
    schedule, scale factor, ...) as .pt or .safetensors (by `fmt`, else by the file extension)."""
    fmt = fmt or ("safetensors" if str(path).endswith(".safetensors") else "pt")
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"export_weights: fmt {fmt!r} is unknown; expected one of {SAVE_FORMATS}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if fmt == "safetensors":
        from safetensors.torch import save as st_save

        payload = st_save(tensors, metadata={"format": WEIGHTS_FORMAT, "version": str(VERSION),
                                             "meta": json.dumps(meta)})
        atomic_write(path, lambda f: f.write(payload))
    else:
        obj = {"format": WEIGHTS_FORMAT, "version": VERSION, "meta": meta, "state_dict": tensors}
        atomic_write(path, lambda f: torch.save(obj, f))


def load_weights(path: str, map_location="cpu") -> tuple[dict, dict]:
    """Reads exported weights (.pt or .safetensors) -> (state_dict, meta)."""
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.getsize(path) > 0 and _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        with open(path, "rb") as f:
            data = f.read()
        try:
            tensors = st_load(data)
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + header_len])
        except (SafetensorError, ValueError, json.JSONDecodeError) as e:
            raise CheckpointError(f"weights {path}: a truncated or corrupt safetensors file ({e})") from None
        meta = header.get("__metadata__") or {}
        if meta.get("format") != WEIGHTS_FORMAT:
            raise CheckpointError(f"weights {path}: a safetensors file, but not diffusion_ext weights "
                                  f"(metadata format = {meta.get('format')!r}, expected {WEIGHTS_FORMAT!r})")
        if meta.get("version") != str(VERSION):
            raise CheckpointError(f"weights {path}: version {meta.get('version')!r}; this diffusion_ext reads {VERSION}")
        return {k: v.to(map_location) for k, v in tensors.items()}, json.loads(meta["meta"])
    obj = _check_format(path, _torch_load(path, map_location), (WEIGHTS_FORMAT,))
    return obj["state_dict"], obj["meta"]


def load_any(path: str, map_location="cpu") -> dict:
    """A training checkpoint or exported weights, as {"kind": "checkpoint"|"weights", "weights": the EMA
    state_dict, "meta": dict with task, model_kind, model_config, config, scale_factor, num_classes, ...,
    "vae": {"config", "state_dict"} for latent diffusion, else None}."""
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.getsize(path) > 0 and _is_safetensors(path):
        sd, meta = load_weights(path, map_location)
        return _split_vae({"kind": "weights", "weights": sd, "meta": meta})
    obj = _torch_load(path, map_location)
    obj = _check_format(path, obj, (CHECKPOINT_FORMAT, WEIGHTS_FORMAT))
    if obj["format"] == WEIGHTS_FORMAT:
        return _split_vae({"kind": "weights", "weights": obj["state_dict"], "meta": obj["meta"]})
    vae = obj.get("vae")
    return {"kind": "checkpoint", "weights": obj["ema"]["module"], "meta": checkpoint_meta(obj), "checkpoint": obj,
            "vae": None if vae is None else {"config": vae["config"], "state_dict": vae["state_dict"]}}


VAE_PREFIX = "vae::"


def _split_vae(out: dict) -> dict:
    """Exported latent-diffusion weights carry their VAE's tensors under keys "vae::<name>"."""
    sd = out["weights"]
    vae_sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    out["weights"] = {k: v for k, v in sd.items() if not k.startswith(VAE_PREFIX)}
    out["vae"] = {"config": out["meta"]["vae_config"], "state_dict": vae_sd} if vae_sd else None
    return out


def checkpoint_meta(ckpt: dict) -> dict:
    """The non-tensor description of a trained model (what exported weights carry beside the tensors)."""
    vae = ckpt.get("vae")
    return {"task": ckpt["config"]["task"], "model_kind": ckpt["model_kind"], "model_config": ckpt["model_config"],
            "config": ckpt["config"], "scale_factor": ckpt.get("scale_factor"), "num_classes": ckpt.get("num_classes"),
            "step": ckpt["step"], "vae_path": None if vae is None else vae.get("path"),
            "vae_config": None if vae is None else vae["config"]}


def to_bytes(obj) -> bytes:
    """torch.save into memory (tests and size estimates)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
