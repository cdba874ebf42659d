"""The real multi-process launch path: `python -m torch.distributed.run --standalone --nproc_per_node=2
-m diffusion_ext train ...` (what `torchrun` runs), gloo on CPU, against one plain `python -m diffusion_ext
train ...` with the same global batch.

test_train.test_ddp_two_processes_equal_one spawns the ranks itself and sets RANK/WORLD_SIZE/MASTER_* by
hand; this test goes through the launcher, its rendezvous and environment, the command line, the process
exit codes and rank 0's writing of the outputs, exactly as a user types it (README, distributed.py).
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import diffusion_ext
from diffusion_ext.checkpoint import load_checkpoint
from diffusion_ext.demo import fused_available
from diffusion_ext.logging_utils import read_jsonl

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

# the tree under test: the children must import this diffusion_ext, not another installed copy
ROOT = str(Path(diffusion_ext.__file__).resolve().parent.parent)
TIMEOUT_S = 240  # a hung rendezvous or collective fails the test instead of hanging it
# the sizes of test_train.tiny(): a run of 3 steps takes a few seconds
TRAIN = ["train", "--task", "pixel", "--data", "builtin:shapes", "--image-size", "8", "--data-size", "40",
         "--base-channels", "16", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-resolutions", "",
         "--dropout", "0", "--head-dim", "16", "--num-groups", "4", "--num-timesteps", "100", "--steps", "3",
         "--batch-size", "8", "--lr", "1e-3", "--ema-decay", "0.9", "--ckpt-every", "3", "--sample-every", "0",
         "--num-samples", "4", "--sample-steps", "3", "--quiet", "--device", "cpu"]
if not fused_available(torch.device("cpu"))[0]:
    TRAIN.append("--eager")  # the same parameters without the kernels that are not built here
# set by a launcher around pytest itself: the one-process run must not believe it is a rank of that job
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _run(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"  # 2 ranks on a small machine; torchrun sets it too, but not the plain run
    # a session of its own, so that on a timeout the launcher's workers are killed with it (by process group)
    p = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=os.name == "posix")
    try:
        out, err = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        if os.name == "posix":
            os.killpg(p.pid, signal.SIGKILL)
        else:
            p.kill()
        out, err = p.communicate()
        pytest.fail(f"{' '.join(args[:6])} ... did not finish in {TIMEOUT_S} s\nstdout:\n{out}\nstderr:\n{err}")
    assert p.returncode == 0, f"{' '.join(args)}\nexit code {p.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def test_torchrun_two_processes_equal_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # --standalone: torchrun's own c10d rendezvous on localhost, on a free port it picks itself (so runs in
    # parallel do not collide). Where it cannot work (no resolvable host name), the equivalent is
    # --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT with a free PORT.
    r2 = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "diffusion_ext",
               *TRAIN, "--out", str(two)], cwd=tmp_path)
    r1 = _run(["-m", "diffusion_ext", *TRAIN, "--out", str(one)], cwd=tmp_path)

    # rank 0 alone reports and writes: one summary line, one record per step, the same files as one process
    for r, out in ((r1, one), (r2, two)):
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("trained ")]
        assert len(lines) == 1 and lines[0].startswith("trained 3 steps") and str(out) in lines[0], r.stdout
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    rec1, rec2 = read_jsonl(one / "log.jsonl"), read_jsonl(two / "log.jsonl")
    assert [(r["step"], r.get("event")) for r in rec2] == [(r["step"], r.get("event")) for r in rec1] == \
        [(1, None), (2, None), (3, None), (3, "samples")]
    assert len((two / "log.jsonl").read_text().splitlines()) == 4  # no line written twice or torn

    # the launcher really made a 2-process job (every rank's generator state is in the checkpoint)
    ck1, ck2 = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(two / "checkpoint.pt")
    assert ck1["world_size"] == 1 and len(ck1["rng"]) == 1
    assert ck2["world_size"] == 2 and len(ck2["rng"]) == 2 and ck2["step"] == ck1["step"] == 3
    assert json.loads((two / "config.json").read_text())["world_size"] == 2

    # 2 ranks × 4 samples == 1 process × 8: the same loss trajectory and parameters, to rounding
    for a, b in zip(rec1[:3], rec2[:3]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-6)
    assert ck2["model"].keys() == ck1["model"].keys()
    for k in ck1["model"]:
        torch.testing.assert_close(ck2["model"][k], ck1["model"][k], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")
    for k in ck1["ema"]["module"]:
        torch.testing.assert_close(ck2["ema"]["module"][k], ck1["ema"]["module"][k], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")
