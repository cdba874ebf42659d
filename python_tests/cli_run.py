"""`python -m diffusion_ext ...` in a child process, as a user runs it (exit code, stdout, stderr, files),
and the tiny training run the CLI tests share: 8×8 builtin:shapes, a two-level UNet, a second a step, on
the CPU whatever the machine has (these tests are about the command line, not the device)."""
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffusion_ext
from diffusion_ext.demo import fused_available

# the tree under test: the child must import this diffusion_ext, not another installed copy
ROOT = str(Path(diffusion_ext.__file__).resolve().parent.parent)
TIMEOUT_S = 240
FUSED = fused_available(torch.device("cpu"))[0]
# on the CPU, and the eager model where a fused kernel is not built here (the same parameters)
CPU = ["--device", "cpu"] + ([] if FUSED else ["--eager"])
TINY = ["--task", "pixel", "--data", "builtin:shapes", "--image-size", "8", "--data-size", "40",
        "--base-channels", "16", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-resolutions", "",
        "--dropout", "0", "--head-dim", "16", "--num-groups", "4", "--num-timesteps", "100", "--batch-size", "8",
        "--lr", "1e-3", "--num-samples", "4", "--sample-steps", "3", *CPU]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([ROOT] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e["OMP_NUM_THREADS"] = "1"  # tiny models; and the machine may be shared
    return e


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """Runs `python -m diffusion_ext ARGS` to the end (a hang fails the test) and returns what it did."""
    p = subprocess.Popen([sys.executable, "-m", "diffusion_ext", *map(str, args)], cwd=cwd, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=os.name == "posix")
    try:
        out, err = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL) if os.name == "posix" else p.kill()
        out, err = p.communicate()
        pytest.fail(f"diffusion_ext {' '.join(map(str, args[:4]))} ... did not finish in {TIMEOUT_S} s\n{out}\n{err}")
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def fingerprint(folder) -> dict:
    """{relative path: sha256} of every file below folder: 'intact' means this is unchanged."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
