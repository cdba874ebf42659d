"""NYU Depth V2 loaders on tiny files written here: the CSV/PNG folder, the labeled HDF5 .mat, splits.mat."""
import logging
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch

from diffusion_ext.data import NYUCsvDataset, NYUMatDataset, build_dataset, depth_to_unit
from diffusion_ext.data.common import resize_depth
from diffusion_ext.data.matv5 import read_mat_v5
from diffusion_ext.data.nyu import load_splits

Image = pytest.importorskip("PIL.Image")
h5py = pytest.importorskip("h5py")


# --- the CSV folder ---------------------------------------------------------------------------------------

def make_csv_folder(root, H=8, W=8):
    """Two train pairs (8-bit depth) and two test pairs (16-bit millimetres), listed like the public release."""
    rng = np.random.default_rng(0)
    rows = {"train": [], "test": []}
    for split in ("train", "test"):
        for i in range(2):
            d = root / "data" / f"nyu2_{split}" / f"scene_{i}"
            d.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(d / "rgb.png")
            if split == "train":
                depth = np.full((H, W), 51 * (i + 1), dtype=np.uint8)          # 2 m, 4 m
            else:
                depth = np.full((H, W), 2500 + 1000 * i, dtype=np.uint16)      # 2.5 m, 3.5 m
                depth[0, 0] = 0                                                # a hole
            Image.fromarray(depth).save(d / "depth.png")
            rows[split].append(f"data/nyu2_{split}/scene_{i}/rgb.png,data/nyu2_{split}/scene_{i}/depth.png")
        (root / f"nyu_{split}.csv").write_text("\n".join(rows[split]) + "\n")
    return root


def test_csv_folder_decodes_8bit_and_16bit_depth(tmp_path):
    root = make_csv_folder(tmp_path)
    train = build_dataset(str(root), image_size=8, split="train", flip=False)
    assert isinstance(train, NYUCsvDataset) and len(train) == 2 and train.kind == "depth" and train.num_classes is None
    it = train[1]
    assert it["image"].shape == (3, 8, 8) and it["depth"].shape == it["depth_m"].shape == it["valid"].shape == (1, 8, 8)
    torch.testing.assert_close(it["depth_m"], torch.full((1, 8, 8), 102 * 10 / 255))
    torch.testing.assert_close(it["depth"], depth_to_unit(it["depth_m"]))
    assert it["valid"].all() and it["valid"].dtype == torch.bool
    rgb = np.asarray(Image.open(root / "data/nyu2_train/scene_1/rgb.png"))
    torch.testing.assert_close(it["image"], torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    test = NYUCsvDataset(root, image_size=8, split="test")
    it = test[0]
    assert test.flip is False and it["depth_m"][0, 1, 1] == pytest.approx(2.5)
    assert not it["valid"][0, 0, 0] and it["depth_m"][0, 0, 0] == 0 and it["valid"].sum() == 63
    assert len(NYUCsvDataset(root, image_size=8, split="val")) == 2          # val falls back to test


def test_csv_paired_flip(tmp_path):
    root = make_csv_folder(tmp_path)
    # a depth ramp along x, so a flip shows
    ramp = (np.arange(8)[None, :].repeat(8, 0) * 30 + 10).astype(np.uint8)
    Image.fromarray(ramp).save(root / "data/nyu2_train/scene_0/depth.png")
    plain = NYUCsvDataset(root, image_size=8, split="train", flip=False)[0]
    ds = NYUCsvDataset(root, image_size=8, split="train")
    torch.manual_seed(0)
    seen = set()
    for _ in range(16):
        it = ds[0]
        flipped = torch.equal(it["depth_m"], plain["depth_m"].flip(-1))
        assert flipped or torch.equal(it["depth_m"], plain["depth_m"])
        assert torch.equal(it["image"], plain["image"].flip(-1) if flipped else plain["image"])
        seen.add(flipped)
    assert seen == {True, False}


def test_csv_resize_keeps_invalid_out(tmp_path):
    root = make_csv_folder(tmp_path, H=12, W=16)
    it = NYUCsvDataset(root, image_size=4, split="test")[0]
    assert it["image"].shape == (3, 4, 4) and it["valid"].all()
    torch.testing.assert_close(it["depth_m"], torch.full((1, 4, 4), 2.5))   # the hole did not pull the mean down


def test_resize_depth_by_hand():
    d = torch.tensor([[[2.0, 2.0, 0.0, 0.0], [4.0, 0.0, 0.0, 5.0], [1, 1, 3, 3], [1, 1, 3, 3]]])
    v = d > 0
    out, ok = resize_depth(d, v, 2, "area")
    torch.testing.assert_close(out, torch.tensor([[[8 / 3, 0.0], [1.0, 3.0]]]))
    assert ok.tolist() == [[[True, False], [True, True]]]    # 1 valid pixel of 4 is not enough
    out, ok = resize_depth(d, v, 2, "nearest")
    assert set(out[ok].tolist()) <= set(d[v].tolist())      # nearest invents no depth


def test_csv_errors(tmp_path):
    root = make_csv_folder(tmp_path)
    (root / "nyu_test.csv").unlink()
    with pytest.raises(FileNotFoundError, match="nyu_test.csv"):
        NYUCsvDataset(root, split="test")
    (root / "nyu_train.csv").write_text("a.png,b.png,c.png\n")
    with pytest.raises(ValueError, match=r"nyu_train.csv:1"):
        NYUCsvDataset(root, split="train")
    (root / "nyu_train.csv").write_text("data/missing.png,data/missing_depth.png\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        NYUCsvDataset(root, split="train")
    with pytest.raises(ValueError, match="depth_resize"):
        NYUCsvDataset(root, split="train", depth_resize="bilinear")


# --- the labeled .mat (HDF5) ------------------------------------------------------------------------------

def make_mat(path, N=10, W=8, H=8, scenes=None, images_shape=None, drop=None):
    """The official layout as h5py sees it: images (N, 3, W, H) uint8, depths (N, W, H) metres."""
    x = np.arange(W)[:, None]
    y = np.arange(H)[None, :]
    depths = np.stack([1.0 + x + 0.1 * y + 0.01 * i for i in range(N)]).astype(np.float32)   # (N, W, H)
    images = np.stack([np.stack([(10 * x + y + c + i) % 256 for c in range(3)]) for i in range(N)]).astype(np.uint8)
    with h5py.File(path, "w") as f:
        if drop != "images":
            f["images"] = images if images_shape is None else np.zeros(images_shape, np.uint8)
        if drop != "depths":
            f["depths"] = depths
        if scenes is not None:   # a MATLAB cell of strings: references to uint16 character codes
            refs = f.create_dataset("scenes", (1, N), dtype=h5py.ref_dtype)
            grp = f.create_group("#refs#")
            for i, s in enumerate(scenes):
                refs[0, i] = grp.create_dataset(f"s{i}", data=np.array([[ord(ch)] for ch in s], np.uint16)).ref
    return path


def test_mat_transposes_to_h_by_w(tmp_path):
    path = make_mat(tmp_path / "nyu.mat")
    ds = build_dataset(str(path), image_size=8, split="train", flip=False, splits={"train": [1, 2, 3], "test": [4]})
    assert isinstance(ds, NYUMatDataset) and len(ds) == 3
    it = ds[2]                                     # file index 2
    r, c = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    torch.testing.assert_close(it["depth_m"][0], 1.0 + c + 0.1 * r + 0.02)      # row = y (H), column = x (W)
    torch.testing.assert_close(it["image"][1], ((10 * c + r + 1 + 2) % 256) / 127.5 - 1)
    assert it["valid"].all()
    # non-square frames resize; the dataset pickles (DataLoader workers) after its file was opened
    wide = NYUMatDataset(make_mat(tmp_path / "wide.mat", W=16, H=12), image_size=4, split="test")
    it = wide[0]
    assert it["image"].shape == (3, 4, 4) and it["depth_m"].shape == (1, 4, 4)
    assert pickle.loads(pickle.dumps(wide))[0]["depth_m"].shape == (1, 4, 4)


def test_mat_substitute_split_by_scene_and_by_index(tmp_path, caplog):
    scenes = ["kitchen_0001", "kitchen_0001", "bedroom_0004", "bedroom_0004", "office_0002",
              "office_0002", "office_0002", "bath_0003", "study_0009", "study_0009"]
    path = make_mat(tmp_path / "nyu.mat", scenes=scenes)
    with caplog.at_level(logging.WARNING, logger="diffusion_ext.data"):
        train = NYUMatDataset(path, split="train")
    assert "substitute split" in caplog.text and "by scene" in caplog.text
    test = NYUMatDataset(path, split="test")
    assert sorted(train.indices.tolist() + test.indices.tolist()) == list(range(10))
    assert not {scenes[i] for i in train.indices} & {scenes[i] for i in test.indices}
    assert len(test) >= round(10 * 654 / 1449)
    again = NYUMatDataset(path, split="test")
    assert again.indices.tolist() == test.indices.tolist()
    plain = make_mat(tmp_path / "plain.mat")
    a, b = NYUMatDataset(plain, split="train"), NYUMatDataset(plain, split="test")
    assert len(b) == round(10 * 654 / 1449) and sorted(a.indices.tolist() + b.indices.tolist()) == list(range(10))


def mat_v5_bytes(variables, compress):
    """A MATLAB v5 file of double matrices, written by hand (the reader's test oracle)."""
    def tag(t, n):
        return struct.pack("<II", t, n)

    def pad(b):
        return b + b"\0" * (-len(b) % 8)
    out = b"MATLAB 5.0 MAT-file, written by test_nyu".ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    for name, arr in variables.items():
        arr = np.asarray(arr, dtype=np.float64)
        body = tag(6, 8) + struct.pack("<II", 6, 0)                               # flags: mxDOUBLE_CLASS
        body += tag(5, 8) + struct.pack("<ii", *arr.shape)
        body += tag(1, len(name)) + pad(name.encode())
        body += tag(9, arr.size * 8) + pad(arr.tobytes(order="F"))
        element = tag(14, len(body)) + body
        out += (tag(15, len(z := zlib.compress(element))) + z) if compress else element
    return out


@pytest.mark.parametrize("form", ["v5", "v5-compressed", "v7.3", "dict"])
def test_official_splits_file(tmp_path, form):
    path = make_mat(tmp_path / "nyu.mat")
    train, test = np.array([[1], [3], [5], [7]]), np.array([[2], [4], [6], [8], [9], [10]])
    if form == "dict":
        splits = {"train": train.ravel().tolist(), "test": test.ravel().tolist()}
    elif form == "v7.3":
        splits = tmp_path / "splits.mat"
        with h5py.File(splits, "w") as f:
            f["trainNdxs"], f["testNdxs"] = train.T, test.T
    else:
        splits = tmp_path / "splits.mat"
        splits.write_bytes(mat_v5_bytes({"trainNdxs": train, "testNdxs": test}, form == "v5-compressed"))
        m = read_mat_v5(splits)
        assert m["trainNdxs"].shape == (4, 1) and m["testNdxs"].ravel().tolist() == test.ravel().tolist()
    assert load_splits(splits)["train"].tolist() == [0, 2, 4, 6]
    ds = NYUMatDataset(path, image_size=8, split="test", splits=splits)
    assert ds.indices.tolist() == [1, 3, 5, 7, 8, 9]
    assert ds[0]["depth_m"][0, 0, 0] == pytest.approx(1.0 + 0.01)


def test_mat_errors(tmp_path):
    with pytest.raises(ValueError, match="'depths'"):
        NYUMatDataset(make_mat(tmp_path / "a.mat", drop="depths"))
    with pytest.raises(ValueError, match=r"images \(N, 3, W, H\)"):
        NYUMatDataset(make_mat(tmp_path / "b.mat", images_shape=(10, 4, 8, 8)))
    with pytest.raises(ValueError, match=r"images \(N, 3, W, H\)"):
        NYUMatDataset(make_mat(tmp_path / "c.mat", images_shape=(9, 3, 8, 8)))   # N differs from depths
    (tmp_path / "text.mat").write_text("not hdf5")
    with pytest.raises(ValueError, match="not an HDF5"):
        NYUMatDataset(tmp_path / "text.mat")
    with pytest.raises(FileNotFoundError, match="absent.mat"):
        build_dataset(str(tmp_path / "absent.mat"))
    good = make_mat(tmp_path / "good.mat")
    with pytest.raises(ValueError, match="within 1..10"):
        NYUMatDataset(good, splits={"train": [0, 1], "test": [2]})
    bad_splits = tmp_path / "splits.mat"
    bad_splits.write_bytes(mat_v5_bytes({"train": np.ones((2, 1))}, False))
    with pytest.raises(ValueError, match="trainNdxs and testNdxs"):
        NYUMatDataset(good, splits=bad_splits)


def test_size_keeps_the_first_items(tmp_path):
    csv_root = make_csv_folder(tmp_path / "csv")
    assert len(build_dataset(str(csv_root), split="train", size=1)) == 1
    path = make_mat(tmp_path / "nyu.mat")
    ds = NYUMatDataset(path, split="test", splits={"train": [1, 2], "test": [3, 4, 5]}, size=2)
    assert ds.indices.tolist() == [2, 3]
    with pytest.raises(ValueError, match="size"):
        NYUMatDataset(path, size=0)
