"""A run whose output goes to a file (nohup, a batch scheduler) says what it is doing: plain progress lines
(step, loss, it/s, ETA) on stdout when stdout is not a terminal; a tqdm bar only on a terminal."""
import io

import pytest

from cli_run import TINY, run_cli
from diffusion_ext import logging_utils
from diffusion_ext.logging_utils import NullBar, ProgressLines, progress_bar


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_lines_after_the_first_step_then_every_interval_and_at_the_end(capsys):
    clock = FakeClock()
    p = ProgressLines(total=10, initial=0, every_s=5.0, clock=clock)
    for step in range(1, 11):
        clock.t = float(step)          # one step a second
        p.set_postfix(loss=1.0 / step)
        p.update(1)
    assert capsys.readouterr().out.splitlines() == [
        "train: step 1/10 (10.0%), loss 1, 1 it/s, ETA 0:00:09",      # the first step: it started, how fast
        "train: step 6/10 (60.0%), loss 0.1667, 1 it/s, ETA 0:00:04",  # 5 s after the previous line
        "train: step 10/10 (100.0%), loss 0.1, 1 it/s, done",          # the last step
    ]


def test_a_resumed_run_counts_from_its_step(capsys):
    clock = FakeClock()
    p = ProgressLines(total=100, initial=40, every_s=1e9, desc="train", clock=clock)
    clock.t = 2.0
    p.update(1)   # no loss logged yet (--log-every > 1)
    assert capsys.readouterr().out == "train: step 41/100 (41.0%), 0.5 it/s, ETA 0:01:58\n"


@pytest.mark.parametrize("stdout_tty, stderr_tty, kind", [
    (False, False, "lines"),    # nohup, batch jobs: both redirected
    (False, True, "both"),      # `train > log.txt`: the bar on the terminal, lines in the file
    (True, True, "bar"),        # an interactive terminal
    (True, False, "lines"),     # `2> err.log`: no bar is drawn, so lines on the terminal
])
def test_what_reports_progress_where(monkeypatch, stdout_tty, stderr_tty, kind):
    pytest.importorskip("tqdm")

    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr(logging_utils.sys, "stdout", Stream(stdout_tty))
    monkeypatch.setattr(logging_utils.sys, "stderr", Stream(stderr_tty))
    got = progress_bar(10, 0, enabled=True)
    parts = got.outs if isinstance(got, logging_utils._Both) else (got,)
    assert {type(p).__name__ for p in parts} == {"lines": {"ProgressLines"}, "bar": {"_Bar"},
                                                  "both": {"_Bar", "ProgressLines"}}[kind]
    got.close()
    assert isinstance(progress_bar(10, 0, enabled=False), NullBar)   # --quiet


def test_train_with_stdout_redirected_prints_progress_lines(tmp_path):
    r = run_cli("train", *TINY, "--steps", "3", "--progress-every", "3600", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("train: step")]
    assert len(lines) == 2, r.stdout
    assert lines[0].startswith("train: step 1/3 (33.3%), loss ") and " it/s, ETA 0:" in lines[0]
    assert lines[1].startswith("train: step 3/3 (100.0%), loss ") and lines[1].endswith(" it/s, done")
    assert r.stdout.splitlines()[-1].startswith("trained 3 steps")
