"""No command loses earlier work, and a run lives in its folder (issue 16).

Each command-line case runs `python -m diffusion_ext ...` in a child process, as a user does, and asserts
its exit code, its message (naming the command, the option, the path and the way on) and that the files
written before are intact, byte for byte. Output paths are checked before any work: the error cases give a
checkpoint that does not exist, so a message about --out proves the check came first. The unit tests at
the end pin down out_paths and run_folder themselves."""
import os
import shutil

import pytest

from cli_run import CPU, TINY, fingerprint, run_cli
from diffusion_ext import out_paths, run_folder
from diffusion_ext.checkpoint import load_checkpoint
from diffusion_ext.logging_utils import read_jsonl


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A finished 2-step run, trained once for the module; its files' fingerprint."""
    out = tmp_path_factory.mktemp("runs") / "first"
    r = run_cli("train", *TINY, "--quiet", "--steps", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "train: step" not in r.stdout  # --quiet: no progress lines either
    return out, fingerprint(out)


def _losses(folder):
    return [r["step"] for r in read_jsonl(folder / "log.jsonl") if "loss" in r]


# ---------------------------------------------------------------------------------------------------------
# train: a folder that holds a run
# ---------------------------------------------------------------------------------------------------------
def test_train_refuses_a_folder_that_holds_a_run(first_run):
    out, before = first_run
    r = run_cli("train", *TINY, "--quiet", "--steps", "3", "--out", out)
    assert r.returncode == 2
    assert r.stderr.startswith(f"diffusion_ext train: --out {out} already holds a run (checkpoint at step 2 of 2, "
                               f"written ")
    assert f"--resume --out {out}" in r.stderr and "--out DIR" in r.stderr and "--overwrite" in r.stderr
    assert "Traceback" not in r.stderr
    assert fingerprint(out) == before


def test_train_overwrite_moves_the_old_run_aside(first_run, tmp_path):
    old = tmp_path / "run"
    shutil.copytree(first_run[0], old)
    before = fingerprint(old)
    r = run_cli("train", *TINY, "--quiet", "--steps", "1", "--out", old, "--overwrite")
    assert r.returncode == 0, r.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and f"moved the run that was in {old} to {aside[0]}" in r.stdout
    assert fingerprint(aside[0]) == before                      # the old run, whole
    assert load_checkpoint(old / "checkpoint.pt")["step"] == 1  # the new one
    assert _losses(old) == [1]


def test_train_out_naming_a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    r = run_cli("train", *TINY, "--steps", "1", "--out", f)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"diffusion_ext train: --out {f}: is an existing file; expected a folder (a new or " \
                               f"existing one)"
    assert f.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------
# resuming: the folder is the run's identity
# ---------------------------------------------------------------------------------------------------------
def test_resume_a_run_copied_elsewhere_by_a_relative_path(first_run, tmp_path):
    moved = tmp_path / "copies" / "moved"
    shutil.copytree(first_run[0], moved)
    (tmp_path / "cwd").mkdir()
    # relative, with a trailing slash, from another folder than the one the run was started in
    r = run_cli("train", "--resume", "--out", "../copies/moved/", "--steps", "3", "--quiet", cwd=tmp_path / "cwd")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("resuming ../copies/moved/ at step 2 of 3 (checkpoint written ")
    assert _losses(moved) == [1, 2, 3] and load_checkpoint(moved / "checkpoint.pt")["step"] == 3


def test_resume_names_every_real_difference_with_both_values(first_run):
    out, before = first_run
    r = run_cli("train", "--resume", "--out", out, "--steps", "4", "--lr", "0.5", "--batch-size", "16",
                "--image-size", "8")  # the same image size is no difference
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"diffusion_ext train --resume: {out / 'checkpoint.pt'} was trained with another "
                               f"configuration: batch_size: 8 in the checkpoint, 16 given; lr: 0.001 in the "
                               f"checkpoint, 0.5 given. ")
    assert "image_size" not in r.stderr and "start a new run with another --out" in r.stderr
    assert fingerprint(out) == before


def test_resume_and_overwrite_exclude_each_other(first_run):
    out, before = first_run
    r = run_cli("train", "--resume", "--overwrite", "--out", out, "--steps", "4")
    assert r.returncode == 2
    assert r.stderr.strip() == "diffusion_ext train: --overwrite starts a new run and --resume continues one; " \
                               "give one of them"
    assert fingerprint(out) == before


# ---------------------------------------------------------------------------------------------------------
# every command that writes checks its output path before any work
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out, why", [
    ("grid.txt", "expected a PNG file name ending in .png"),
    ("somedir/", "is a folder; expected a PNG file name such as somedir/out.png"),
    ("afile/grid.png", "is a file, not a folder, so nothing can be written below it"),
])
def test_sample_checks_out_before_sampling(tmp_path, out, why):
    (tmp_path / "somedir").mkdir()
    (tmp_path / "somedir" / "old.png").write_bytes(b"old")
    (tmp_path / "afile").write_text("a file")
    before = fingerprint(tmp_path)
    r = run_cli("sample", "--checkpoint", "missing.pt", "--out", out, *CPU, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"diffusion_ext sample: --out {out}") and why in r.stderr
    assert r.stderr.rstrip().endswith("nothing was done")
    assert fingerprint(tmp_path) == before


def test_predict_depth_checks_out_before_loading(tmp_path):
    r = run_cli("predict-depth", "--checkpoint", "missing.pt", "--image", "room.png", "--out", "x.txt", *CPU,
                cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == "diffusion_ext predict-depth: --out x.txt: expected a PNG file name ending in .png; " \
                               "nothing was done"


def test_eval_depth_checks_out_before_loading(tmp_path):
    (tmp_path / "report").write_text("keep")
    r = run_cli("eval-depth", "--checkpoint", "missing.pt", "--data", "builtin:depth-scenes", "--out", "report",
                *CPU, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("diffusion_ext eval-depth: --out report: is an existing file; expected a folder")
    assert (tmp_path / "report").read_text() == "keep"


def test_bench_checks_markdown_before_measuring(tmp_path):
    (tmp_path / "results").mkdir()
    r = run_cli("bench", "--device", "cpu", "--quick", "--markdown", "results", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""  # nothing measured
    assert r.stderr.startswith("diffusion_ext bench: --markdown results: is a folder; expected a markdown file name")


def test_demo_refuses_a_folder_that_holds_a_run(first_run):
    out, before = first_run
    r = run_cli("demo", "--out", out, "--steps", "1")
    assert r.returncode == 2 and r.stdout == ""  # nothing trained
    assert r.stderr.startswith(f"diffusion_ext demo: --out {out} already holds a run")
    assert "--resume" not in r.stderr and "--overwrite" in r.stderr  # the demo cannot resume
    assert fingerprint(out) == before


# ---------------------------------------------------------------------------------------------------------
# the library underneath
# ---------------------------------------------------------------------------------------------------------
def test_out_paths(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    ok = str(tmp_path / "new" / "deeper" / "grid.PNG")  # folders yet to be made; extension in any case
    assert out_paths.check_out_file(ok, "--out", (".png",)) == ok
    assert out_paths.check_out_dir(str(tmp_path / "d"), "--out") == str(tmp_path / "d")
    assert out_paths.check_out_dir(str(tmp_path / "new" / "run"), "--out")
    cases = [
        (lambda: out_paths.check_out_file(str(tmp_path / "d"), "--out", (".png",), "PNG file"), "is a folder"),
        (lambda: out_paths.check_out_file("", "--out"), "the path is empty"),
        (lambda: out_paths.check_out_file(str(tmp_path / "nodir") + os.sep, "--out", (".png",)),
         "names a folder \\(it ends in /\\); expected a file name such as .*nodir/out.png"),
        (lambda: out_paths.check_out_file(str(tmp_path / "f" / "a.png"), "--out", (".png",)), "is a file, not a folder"),
        (lambda: out_paths.check_out_dir(str(tmp_path / "f"), "--out"), "is an existing file"),
        (lambda: out_paths.check_out_dir(str(tmp_path / "f" / "sub"), "--out"), "is a file, not a folder"),
    ]
    for check, why in cases:
        with pytest.raises(ValueError, match=why):
            check()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions and a non-root user")
def test_out_paths_unwritable_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            out_paths.check_out_file(str(ro / "a.png"), "--out", (".png",))
    finally:
        ro.chmod(0o700)


def test_run_folder_description_and_aside_names(first_run, tmp_path):
    out, _ = first_run
    assert run_folder.run_files(str(out)) == ["checkpoint.pt", "config.json", "log.jsonl", "weights.pt",
                                              "loss.png", "samples"]
    assert run_folder.describe_run(str(out)).startswith("checkpoint at step 2 of 2, written ")
    crashed = tmp_path / "crashed"  # stopped before its first checkpoint: still a run
    crashed.mkdir()
    (crashed / "log.jsonl").write_text("")
    assert run_folder.describe_run(str(crashed)) == "its files: log.jsonl"
    assert run_folder.prepare_new_run(str(tmp_path / "fresh"), overwrite=False) is None
    with pytest.raises(ValueError, match="already holds a run"):
        run_folder.prepare_new_run(str(crashed), overwrite=False)
    a = run_folder.prepare_new_run(str(crashed), overwrite=True)
    assert os.path.basename(a).startswith("crashed.old-") and os.path.isfile(os.path.join(a, "log.jsonl"))
    assert run_folder.aside_name(str(crashed)) != a  # a free name, also within the same second


def test_config_differences():
    defaults = {"lr": 1e-4, "channel_mults": None, "data": "builtin:shapes", "steps": 10, "new_option": 3}
    saved = {"lr": 1e-3, "channel_mults": (1, 2), "data": "imgs", "steps": 5}
    given = {"lr": 1e-3, "channel_mults": [1, 2], "data": os.path.abspath("imgs/"), "steps": 20, "out": "x",
             "new_option": 4, "unknown": 1}
    # lists and tuples, spellings of one path, may_change, out and unknown names are no difference; an
    # option newer than the checkpoint is compared with its default
    assert run_folder.config_differences(saved, given, defaults, ("steps",)) == \
        ["new_option: 3 in the checkpoint, 4 given"]
