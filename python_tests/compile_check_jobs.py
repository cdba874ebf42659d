"""The compile-for-GPU check's subprocesses (python -m diffusion_ext.triton.compile_check), started once per
test session as soon as collection ends and run in the background at the lowest CPU priority, so that they
fill what the rest of the suite leaves of the cores instead of running alone at its end.

Why the background, and why nice 19: the check is minutes of single-threaded Triton/LLVM/ptxas work per
process, and the rest of the suite keeps ~1.3 of 2 cores busy on average (mostly one Python thread). At the
default priority, processes beside the tests' two OpenMP threads make every fork/join of those threads wait a
scheduler slice (measured when CI ran the CUDA build beside pytest: one learning test 1086 s against ~100 s);
at nice 19 the scheduler gives a waking test thread the core at once (CFS weight 15 against 1024) and the
compile only takes what would be idle. test_triton_compile.py's fixture collects the results, starting the
jobs itself (at the default priority) where the session did not: under pytest-xdist workers, or when the
module is imported otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

# target -> its compile_check arguments: Hopper's full set over two processes (--jobs: the ops split by compile
# time), Ampere's reduced set in a third
TARGETS = {"h200": ["--jobs", "2"], "a100": ["--reduced"]}
MODULE = "test_triton_compile.py"  # the tests that read the results

_jobs: "Jobs | None" = None


class Jobs:
    def __init__(self, niceness: int):
        self.dir = tempfile.mkdtemp(prefix="compile_check_")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile-only needs the real kernels
        self.procs = {}
        for device, extra in TARGETS.items():
            cmd = [sys.executable, "-m", "diffusion_ext.triton.compile_check", "--device", device, "--quiet",
                   "--json", self._json(device), *extra]
            with open(self._log(device), "w") as log:  # a file, not a pipe: nobody reads it until the end
                self.procs[device] = subprocess.Popen(
                    cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                    preexec_fn=(lambda: os.nice(niceness)) if niceness else None)

    def _json(self, device: str) -> str:
        return os.path.join(self.dir, f"{device}.json")

    def _log(self, device: str) -> str:
        return os.path.join(self.dir, f"{device}.log")

    def results(self, timeout: float = 3600) -> tuple[dict, dict]:
        """Waits for every job: ({device: rows}, {device: log text}); a job that wrote no rows raises."""
        rows, logs = {}, {}
        for device, p in self.procs.items():
            p.wait(timeout=timeout)
            with open(self._log(device)) as f:
                logs[device] = f.read()
            path = self._json(device)
            assert os.path.exists(path), \
                f"compile_check --device {device} {TARGETS[device]} wrote no results:\n{logs[device][-3000:]}"
            with open(path) as f:
                rows[device] = json.load(f)
        return rows, logs

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_in_background(items) -> None:
    """From conftest's pytest_collection_finish: start the jobs, niced, when the session will run the module's
    tests (not deselected, not --collect-only, Triton installed) and this is not an xdist worker (each worker
    collects every test; the one that runs the module starts its own)."""
    global _jobs
    import importlib.util

    if _jobs is not None or os.environ.get("PYTEST_XDIST_WORKER") or importlib.util.find_spec("triton") is None:
        return
    if any(os.path.basename(str(item.path)) == MODULE for item in items):
        _jobs = Jobs(niceness=19)


def results() -> tuple[dict, dict]:
    """The results of the session's background jobs, or of jobs started now and waited for."""
    global _jobs
    if _jobs is None:
        _jobs = Jobs(niceness=0)
    return _jobs.results()


def stop() -> None:
    """From conftest's pytest_sessionfinish: an interrupted or failed-early session leaves no compiler running."""
    global _jobs
    if _jobs is not None:
        _jobs.stop()
        _jobs = None
