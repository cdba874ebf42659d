"""`train --data FOLDER` from the command line (a child process each): the warning for images much smaller
than --image-size, and --max-bad-fraction, the limit on unreadable files that the data set has always had."""
import numpy as np
import pytest
from PIL import Image

from cli_run import TINY, fingerprint, run_cli

# TINY with an image folder instead of builtin:shapes
FOLDER_TINY = [a for a in TINY if a not in ("--data", "builtin:shapes", "--data-size", "40")] + ["--quiet"]


def write_pngs(folder, n, size):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_a_folder_of_1x1_images_trains_with_a_warning(tmp_path):
    write_pngs(tmp_path / "icons", 8, size=1)
    r = run_cli("train", *FOLDER_TINY, "--data", tmp_path / "icons", "--steps", "1", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert f"8 of 8 images read below {tmp_path / 'icons'} are smaller than 1/2 of image_size = 8 (median 1×1 px)" \
        in r.stderr
    assert r.stdout.startswith("trained 1 steps")


@pytest.fixture
def folder_with_bad_files(tmp_path):
    data = tmp_path / "photos"
    write_pngs(data, 8, size=8)
    for k in range(2):  # 2 of 10 files unreadable: more than the default 0.1
        (data / f"bad{k}.png").write_bytes(b"not a png at all")
    return data


def test_too_many_unreadable_files_stop_before_training(folder_with_bad_files, tmp_path):
    before = fingerprint(folder_with_bad_files)
    r = run_cli("train", *FOLDER_TINY, "--data", folder_with_bad_files, "--steps", "1", "--out", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "diffusion_ext train: ImageFolderDataset: 2 of 10 files below" in r.stderr
    assert "(more than max_bad_fraction = 0.1): " in r.stderr and "bad0.png" in r.stderr
    assert fingerprint(folder_with_bad_files) == before


def test_max_bad_fraction_lets_them_be_skipped(folder_with_bad_files, tmp_path):
    r = run_cli("train", *FOLDER_TINY, "--data", folder_with_bad_files, "--steps", "1", "--max-bad-fraction", "0.25",
                "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "skipped 2 of 10 files" in r.stderr and r.stdout.startswith("trained 1 steps")


@pytest.mark.parametrize("data, value, message", [
    ("builtin:shapes", "0.5", "max_bad_fraction (--max-bad-fraction) applies to folders of JPEG/PNG images"),
    ("FOLDER", "1.5", "TrainConfig: max_bad_fraction = 1.5; expected a fraction in [0, 1]"),
])
def test_max_bad_fraction_errors(folder_with_bad_files, tmp_path, data, value, message):
    data = folder_with_bad_files if data == "FOLDER" else data
    r = run_cli("train", *FOLDER_TINY, "--data", data, "--max-bad-fraction", value, "--out", tmp_path / "run")
    assert r.returncode == 2 and r.stderr.startswith("diffusion_ext train: ") and message in r.stderr
    assert not (tmp_path / "run").exists()
