"""Data sets: builtin:shapes and its checker, builtin:depth-scenes geometry, image folders, build_dataset."""
import dataclasses
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_ext.data import (DepthScenesDataset, ImageFolderDataset, ShapesDataset, build_dataset,
                                depth_to_unit, is_valid_shape_image, unit_to_depth, valid_fraction)
from diffusion_ext.data import depth_scenes as dsc
from diffusion_ext.data.common import item_rng

PIL = pytest.importorskip("PIL.Image")


# --- builtin:shapes -------------------------------------------------------------------------------------

def shapes(n, S, seed=0, split="train"):
    ds = ShapesDataset(size=n, image_size=S, seed=seed, split=split)
    return torch.stack([ds[i]["image"] for i in range(n)]), torch.stack([ds[i]["label"] for i in range(n)])


def gaussian_blur(x, sigma):
    r = int(3 * sigma + 1)
    k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sigma * sigma))
    k = k / k.sum()
    B, C, H, W = x.shape
    y = F.pad(x.reshape(B * C, 1, H, W), (r, r, r, r), mode="replicate")
    y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return y.reshape(B, C, H, W)


@pytest.mark.parametrize("S", [16, 32])
def test_shapes_deterministic_ranges_and_labels(S):
    x, y = shapes(40, S, seed=3)
    x2, y2 = shapes(40, S, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, shapes(40, S, seed=4)[0])
    assert not torch.equal(x, shapes(40, S, seed=3, split="test")[0])
    assert x.shape == (40, 3, S, S) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    assert set(y.tolist()) == {0, 1, 2}
    # item i does not depend on the order of access
    ds = ShapesDataset(size=40, image_size=S, seed=3)
    assert torch.equal(ds[17]["image"], x[17]) and ds.num_classes == 3 and ds.kind == "image"


@pytest.mark.parametrize("S", [16, 32])
def test_shape_checker_accepts_members_rejects_noise_blur_blends(S):
    x, _ = shapes(200, S, seed=1)
    assert valid_fraction(x) >= 0.95
    g = torch.Generator().manual_seed(0)
    assert valid_fraction((x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)) >= 0.95
    assert valid_fraction(torch.randn(200, 3, S, S, generator=g).clamp(-1, 1)) == 0.0
    assert valid_fraction(torch.rand(200, 3, S, S, generator=g) * 2 - 1) == 0.0
    assert valid_fraction(gaussian_blur(x, 1.0 * S / 16)) <= 0.05
    assert valid_fraction(0.5 * x[:100] + 0.5 * x[100:]) <= 0.05
    assert not is_valid_shape_image(torch.full((3, S, S), 0.3))          # plain colour, no shape


def test_shape_checker_rejects_two_shapes_and_bad_input():
    x, _ = shapes(1, 32, seed=0)
    img = x[0].clone()
    bg = img[:, 0, 0].clone()
    two = bg[:, None, None].expand(3, 32, 32).clone()
    fg = torch.tensor([-0.8, 0.6, -0.6]) if not torch.allclose(bg, torch.tensor([-0.8, 0.6, -0.6])) else \
        torch.tensor([0.9, 0.9, 0.9])
    two[:, 4:12, 4:12] = fg[:, None, None]
    two[:, 20:28, 20:28] = fg[:, None, None]
    assert not is_valid_shape_image(two)             # two blobs of the shape colour
    one = two.clone()
    one[:, 20:28, 20:28] = bg[:, None, None]
    assert is_valid_shape_image(one)
    with pytest.raises(ValueError, match="is_valid_shape_image"):
        is_valid_shape_image(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="valid_fraction"):
        valid_fraction(torch.zeros(3, 8, 8))


# --- builtin:depth-scenes --------------------------------------------------------------------------------

def test_depth_scenes_deterministic_and_ranges():
    ds = DepthScenesDataset(size=8, image_size=32, seed=5)
    a, b = ds[3], DepthScenesDataset(size=8, image_size=32, seed=5)[3]
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["depth_m"], DepthScenesDataset(size=8, image_size=32, seed=6)[3]["depth_m"])
    for i in range(8):
        it = ds[i]
        assert it["image"].shape == (3, 32, 32) and it["depth"].shape == it["depth_m"].shape == (1, 32, 32)
        assert it["valid"].dtype == torch.bool and it["valid"].all()
        assert it["image"].min() >= -1 and it["image"].max() <= 1
        assert 1.0 <= it["depth_m"].min() and it["depth_m"].max() <= 10.0
        torch.testing.assert_close(it["depth"], depth_to_unit(it["depth_m"]))
    assert ds.kind == "depth" and ds.num_classes is None


def backproject(scene, depth):
    """World points of each pixel from its z-depth (the inverse of the renderer's camera model)."""
    S = depth.shape[0]
    d = dsc.camera_rays(scene, S)                   # unit component along the optical axis
    return (scene.camera[:, None] + d * depth.reshape(1, -1).astype(np.float64)).reshape(3, S, S)


def test_depth_scenes_geometry_is_exact():
    scene = dsc.random_scene(item_rng(0, "train", 1), num_boxes=1, num_spheres=1)
    rgb, depth, ids = dsc.render(scene, 48)
    p = backproject(scene, depth)
    floor, back = ids == dsc.FLOOR, ids == dsc.BACK_WALL
    assert floor.sum() > 100 and back.sum() > 100
    np.testing.assert_allclose(p[1][floor], 0.0, atol=1e-4)            # floor points lie on y = 0
    np.testing.assert_allclose(p[2][back], scene.depth, atol=1e-4)     # back-wall points on z = D
    for k, (c, r, _) in enumerate(scene.spheres):
        on = ids == 5 + len(scene.boxes) + k
        dist = np.linalg.norm(p[:, on] - c[:, None], axis=0)
        np.testing.assert_allclose(dist, r, atol=1e-4)                  # sphere points at distance r


def test_depth_scenes_floor_recedes_and_objects_occlude():
    scene = dsc.random_scene(item_rng(0, "train", 2), num_boxes=0, num_spheres=0)
    _, depth, ids = dsc.render(scene, 32)
    for col in range(32):   # up a column, floor depth grows towards the horizon
        rows = np.flatnonzero(ids[:, col] == dsc.FLOOR)[::-1]
        assert len(rows) > 3 and np.all(np.diff(depth[rows, col]) > 0)
    # a sphere in front of the back wall: closer than the wall it hides, which is where it was
    ball = dataclasses.replace(scene, spheres=[(np.array([scene.camera[0], 1.4, scene.depth - 1.0]), 0.5,
                                                np.array([0.8, 0.2, 0.2]))])
    _, d_ball, ids_ball = dsc.render(ball, 32)
    on = ids_ball == 5
    assert on.sum() > 4
    assert np.all(d_ball[on] < depth[on]) and np.all(np.isin(ids[on], [dsc.BACK_WALL, dsc.FLOOR, dsc.CEILING]))
    np.testing.assert_array_equal(d_ball[~on], depth[~on])


# --- image folders ----------------------------------------------------------------------------------------

def write_images(folder, n, size=(20, 14), fmt="png"):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        p = folder / f"{i:06d}.{'jpg' if fmt == 'jpg' else 'png'}"
        PIL.fromarray(arr).save(p)
        paths.append(p)
    return paths


def test_image_folder_png_jpeg_tree(tmp_path):
    write_images(tmp_path / "a", 3, fmt="png")
    write_images(tmp_path / "b" / "c", 2, fmt="jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = build_dataset(str(tmp_path), image_size=8, split="test")
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 5 and ds.num_classes is None and ds.kind == "image"
    x = ds[0]["image"]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    # centre crop then antialiased resize: equals Pillow on the 14×14 centre of the 20×14 image
    with PIL.open(ds.paths[0]) as im:
        ref = np.asarray(im.convert("RGB").crop((3, 0, 17, 14)).resize((8, 8), PIL.Resampling.BICUBIC))
    torch.testing.assert_close(x, torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    # the train split flips some items horizontally, and nothing else
    train = ImageFolderDataset(tmp_path, image_size=8, split="train")
    torch.manual_seed(0)
    outs = [train[0]["image"] for _ in range(20)]
    assert all(torch.equal(o, x) or torch.equal(o, x.flip(-1)) for o in outs)
    assert any(torch.equal(o, x.flip(-1)) for o in outs) and any(torch.equal(o, x) for o in outs)


def test_image_folder_corrupt_files_skipped_and_counted(tmp_path, caplog):
    write_images(tmp_path, 20)
    (tmp_path / "empty.png").write_bytes(b"")                          # caught by the header check
    good = (tmp_path / "000000.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[:60])                # header fine, data cut: caught on read
    with caplog.at_level(logging.WARNING, logger="diffusion_ext.data"):
        ds = ImageFolderDataset(tmp_path, image_size=8, split="test")
    assert len(ds) == 21 and ds.num_skipped == 1
    assert "skipped 1 of 22" in caplog.text and "empty.png" in caplog.text
    i = [p.name for p in ds.paths].index("truncated.png")
    with caplog.at_level(logging.WARNING, logger="diffusion_ext.data"):
        item = ds[i]                                                    # replaced by the next readable file
    assert "truncated.png" in caplog.text and i in ds.bad_at_read
    assert torch.equal(item["image"], ds[(i + 1) % len(ds)]["image"])


def test_image_folder_too_many_corrupt_or_empty(tmp_path):
    write_images(tmp_path, 4)
    for k in range(2):
        (tmp_path / f"bad{k}.jpg").write_bytes(b"garbage!")
    with pytest.raises(ValueError, match=r"2 of 6 files.*bad0\.jpg"):
        ImageFolderDataset(tmp_path, image_size=8)
    assert len(ImageFolderDataset(tmp_path, image_size=8, max_bad_fraction=0.5)) == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .jpg/.jpeg/.png files"):
        ImageFolderDataset(tmp_path / "empty")
    # decode failures found while reading count against the same budget
    other = tmp_path / "other"
    write_images(other, 3)
    for p in sorted(other.iterdir()):
        p.write_bytes(p.read_bytes()[:60])
    ds = ImageFolderDataset(other, image_size=8)
    with pytest.raises(ValueError, match="cannot be decoded|are bad"):
        ds[0]


def test_image_folder_warns_when_most_images_are_much_smaller(tmp_path, caplog):
    """A folder of 1×1 images would train silently on images blown up to image_size: say so."""
    write_images(tmp_path / "tiny", 5, size=(1, 1))
    write_images(tmp_path / "tiny" / "big", 2, size=(20, 14))   # a minority of large ones does not silence it
    with caplog.at_level(logging.WARNING, logger="diffusion_ext.data"):
        ds = ImageFolderDataset(tmp_path / "tiny", image_size=16)
    assert ds.small == (5, 7, (1, 1))
    assert "5 of 7 images read below" in caplog.text and "smaller than 1/2 of image_size = 16" in caplog.text
    assert "(median 1×1 px)" in caplog.text and "smaller --image-size" in caplog.text
    caplog.clear()
    write_images(tmp_path / "ok", 4, size=(20, 14))
    with caplog.at_level(logging.WARNING, logger="diffusion_ext.data"):
        assert ImageFolderDataset(tmp_path / "ok", image_size=28).small is None   # 14 px is half of 28: not "much"
        assert ImageFolderDataset(tmp_path / "ok", image_size=29).small == (4, 4, (20, 14))
        assert ImageFolderDataset(tmp_path / "ok", image_size=16, crop=6).small == (4, 4, (20, 14))  # 6 px crops
    assert caplog.text.count("smaller than 1/2 of image_size") == 2


def test_max_bad_fraction_is_for_image_folders(tmp_path):
    with pytest.raises(ValueError, match=r"max_bad_fraction \(--max-bad-fraction\) applies to folders of JPEG/PNG "
                                         r"images.*'builtin:shapes' is a ShapesDataset"):
        build_dataset("builtin:shapes", max_bad_fraction=0.5)
    write_images(tmp_path, 2)
    assert build_dataset(str(tmp_path), image_size=8, max_bad_fraction=0.0).max_bad_fraction == 0.0


def test_celeba_partition_file(tmp_path):
    img = tmp_path / "img_align_celeba"
    paths = write_images(img, 6)
    (tmp_path / "list_eval_partition.txt").write_text(
        "".join(f"{p.name} {c}\n" for p, c in zip(paths, [0, 0, 0, 1, 2, 2])))
    sizes = {s: len(ImageFolderDataset(img, image_size=8, split=s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 3, "val": 1, "test": 2}
    test = ImageFolderDataset(img, image_size=8, split="test")
    assert [p.name for p in test.paths] == [paths[4].name, paths[5].name]
    assert [p.name for p in ImageFolderDataset(img, split="train", size=2).paths] == [paths[0].name, paths[1].name]
    bad = tmp_path / "bad_partition.txt"
    bad.write_text("000000.png 7\n")
    with pytest.raises(ValueError, match="bad_partition.txt:1"):
        ImageFolderDataset(img, partition=bad)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        ImageFolderDataset(img, partition=tmp_path / "nope.txt")


# --- build_dataset ----------------------------------------------------------------------------------------

def test_build_dataset_dispatch_and_errors(tmp_path):
    ds = build_dataset("builtin:shapes", image_size=16, split="test", seed=2, size=7)
    assert isinstance(ds, ShapesDataset) and len(ds) == 7 and ds.image_size == 16
    assert len(build_dataset("builtin:depth-scenes", image_size=16)) == 10_000
    assert len(build_dataset("builtin:shapes", image_size=16, split="val")) == 1_000
    with pytest.raises(ValueError, match="builtin:circles"):
        build_dataset("builtin:circles")
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        build_dataset(str(tmp_path / "no_such_folder"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="x.txt"):
        build_dataset(str(tmp_path / "x.txt"))
    with pytest.raises(ValueError, match="split"):
        build_dataset("builtin:shapes", split="training")
    with pytest.raises(ValueError, match="image_size"):
        build_dataset("builtin:shapes", image_size=0)


def test_depth_unit_roundtrip():
    d = torch.tensor([0.0, 2.5, 5.0, 10.0, 12.0])
    torch.testing.assert_close(depth_to_unit(d), torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(unit_to_depth(depth_to_unit(d[:4])), d[:4])
    assert math.isclose(float(unit_to_depth(torch.tensor(-2.0))), 0.0)
