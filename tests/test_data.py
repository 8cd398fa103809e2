import json
"""Label parsing, the course datasets, the stratified split and the transforms."""
import numpy as np
import pytest
import torch
from PIL import Image

import helpers as h
from cocochallenge import config, data, files, split, transforms
from conftest import write_labels


def _layout(tmp_path, rows, size=(40, 30)):
    root = tmp_path / "ms-coco"
    write_labels(root / "labels" / "train", rows)
    (root / "images" / "train-resized").mkdir(parents=True)
    for stem in rows:
        Image.new("RGB", size, (10, 20, 30)).save(root / "images" / "train-resized" / f"{stem}.jpg")
    return root


def test_labels_parsed_once_into_matrix(tmp_path):
    root = _layout(tmp_path, {"000000000002": [5, 1], "000000000001": [0]})
    (root / "labels/train/000000000003.cls").write_text("3\r\n\r\n7\r\n3\n")   # CRLF, blank, dup
    Image.new("L", (20, 50)).save(root / "images/train-resized/000000000003.jpg")
    ds = h.COCOTrainImageDataset(root / "images/train-resized", root / "labels/train")
    assert ds.stems == ["000000000001", "000000000002", "000000000003"]
    assert ds.labels.dtype == np.uint8 and ds.labels.shape == (3, 80)
    assert np.flatnonzero(ds.labels[1]).tolist() == [1, 5]
    assert np.flatnonzero(ds.labels[2]).tolist() == [3, 7]
    img, target = ds[2]                             # a grayscale image simply works
    assert img.mode == "RGB" and target.dtype == torch.float32 and target.sum() == 2
    # labels are not re-read: deleting the files does not change the dataset's targets
    for f in (root / "labels/train").iterdir():
        f.unlink()
    assert ds[1][1][5] == 1


@pytest.mark.parametrize("content,line,what", [("3\nfoo\n", 2, "not a class index"),
                                               ("80\n", 1, "outside 0..79"),
                                               ("1\n-1\n", 2, "outside 0..79"),
                                               ("2.5\n", 1, "not a class index")])
def test_malformed_label_names_file_and_line(tmp_path, content, line, what):
    root = _layout(tmp_path, {"000000000001": [0], "000000000002": [1]})
    (root / "labels/train/000000000002.cls").write_text(content)
    with pytest.raises(data.DataError) as err:
        h.COCOTrainImageDataset(root / "images/train-resized", root / "labels/train")
    msg = str(err.value)
    assert "000000000002.cls" in msg and f"line {line}" in msg and what in msg


def test_empty_label_file_means_no_object(tmp_path):
    root = _layout(tmp_path, {"000000000001": [0], "000000000002": [4]})
    (root / "labels/train/000000000001.cls").write_text("\n")
    ds = h.COCOTrainImageDataset(root / "images/train-resized", root / "labels/train")
    assert ds.labels[0].sum() == 0 and ds.labels[1, 4] == 1


def test_max_images_and_test_dataset(demo_root):
    p = data.data_paths(demo_root)
    ds = h.COCOTrainImageDataset(p["train_images"], p["train_labels"], max_images=10)
    assert len(ds) == 10 and ds.labels.shape == (10, 80)
    test = h.COCOTestImageDataset(p["test_images"])
    img, stem = test[0]
    assert isinstance(stem, str) and len(stem) == 12 and img.mode == "RGB"
    assert len(test) == 40


def test_stratified_split_properties():
    rng = np.random.default_rng(0)
    prev = np.r_[0.5, np.geomspace(0.2, 0.002, 79)]
    Y = (rng.random((3000, 80)) < prev).astype(np.uint8)
    Y[Y.sum(1) == 0, 0] = 1
    Y[:2, 79] = 1                                          # a class with exactly 2 images
    Y[2:, 79] = 0
    tr, va = split.stratified_split(Y, 0.2, seed=1)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(Y)
    assert abs(len(va) / len(Y) - 0.2) < 0.01
    counts = Y.sum(0)
    both = (Y[tr].sum(0) > 0) & (Y[va].sum(0) > 0)
    assert both[counts >= 2].all()
    frequent = counts >= 100
    share = Y[va].sum(0)[frequent] / counts[frequent]
    assert np.abs(share - 0.2).max() < 0.03
    # a random split of the same data is clearly less even on the rare classes
    rare = (counts >= 2) & (counts < 30)
    target = 0.2 * counts[rare]
    strat_err = np.abs(Y[va].sum(0)[rare] - target).mean()
    rand_err = np.mean([np.abs(Y[np.random.default_rng(s).permutation(len(Y))[:len(va)]].sum(0)[rare] - target).mean()
                        for s in range(5)])
    assert strat_err < 0.6 * rand_err, (strat_err, rand_err)
    again = split.stratified_split(Y, 0.2, seed=1)
    assert np.array_equal(again[0], tr) and np.array_equal(again[1], va)
    other = split.stratified_split(Y, 0.2, seed=2)
    assert not np.array_equal(other[1], va)


def test_split_file_is_reused_and_checked(tmp_path, demo_root):
    p = data.data_paths(demo_root)
    ds = h.COCOTrainImageDataset(p["train_images"], p["train_labels"])
    path = tmp_path / "split.json"
    tr, va = split.load_or_make_split(ds, path, 0.2, seed=0, data_id="abc")
    assert path.exists()
    tr2, va2 = split.load_or_make_split(ds, path, 0.2, seed=0, data_id="abc")    # same settings: reused
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    before = path.read_bytes()
    with pytest.raises(files.StaleRunError) as err:          # new settings never silently overridden
        split.load_or_make_split(ds, path, 0.5, seed=99, data_id="abc")
    msg = str(err.value)
    assert "seed: 0 -> 99" in msg and "val_fraction: 0.2 -> 0.5" in msg and "RUN_DIR" in msg and "RETRAIN" in msg
    assert path.read_bytes() == before
    with pytest.raises(files.StaleRunError, match="data: 'abc' -> 'xyz'"):
        split.load_or_make_split(ds, path, 0.2, seed=0, data_id="xyz")
    small = h.COCOTrainImageDataset(p["train_images"], p["train_labels"], max_images=50)
    with pytest.raises(files.StaleRunError, match="the data has 50"):
        split.load_or_make_split(small, path, 0.2, seed=0, data_id="abc")
    tr3, va3 = split.load_or_make_split(ds, path, 0.5, seed=99, data_id="abc", replace=True)  # the switch
    assert abs(len(va3) / len(ds) - 0.5) < 0.05 and json.loads(path.read_text())["seed"] == 99


def test_each_side_has_its_own_transform(demo_root):
    p = data.data_paths(demo_root)
    ds = h.COCOTrainImageDataset(p["train_images"], p["train_labels"])
    pre = {"size": 64, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    train_t, eval_t = transforms.build_transform(pre, train=True), transforms.build_transform(pre, train=False)
    tr = ds.subset(np.arange(0, 10), train_t)
    va = ds.subset(np.arange(10, 20), eval_t)
    assert tr.transform is train_t and va.transform is eval_t and ds.transform is None
    a, b = va[0][0], va[0][0]
    assert torch.equal(a, b)                                  # validation is deterministic
    assert a.shape == (3, 64, 64)
    assert isinstance(ds[0][0], Image.Image)                  # the parent is untouched
    assert np.array_equal(va.labels, ds.labels[10:20])


def test_resize_pad_keeps_aspect():
    img = Image.new("RGB", (224, 100), (255, 0, 0))
    out = transforms.ResizePad(224, fill=(0, 0, 0))(img)
    arr = np.asarray(out)
    assert out.size == (224, 224)
    assert arr[112, 112, 0] == 255 and arr[0, 112].sum() == 0 and arr[-1, 112].sum() == 0
    plain = transforms.build_transform({"size": 32, "mean": (0,) * 3, "std": (1,) * 3}, pad=False)
    assert plain(img).shape == (3, 32, 32)


def test_env_config_casts(monkeypatch):
    monkeypatch.setenv("COCO_EPOCHS", "7")
    monkeypatch.setenv("COCO_BACKBONES", "resnet50, efficientnet_lite0")
    monkeypatch.setenv("COCO_SMOKE", "1")
    out = config.env_config({"epochs": 3, "backbones": ["x"], "smoke": False, "lr": 0.1})
    assert out == {"epochs": 7, "backbones": ["resnet50", "efficientnet_lite0"], "smoke": True, "lr": 0.1}
    monkeypatch.setenv("COCO_LR", "fast")
    with pytest.raises(ValueError, match="COCO_LR"):
        config.env_config({"lr": 0.1})


def test_missing_data_root_explains_layout(tmp_path):
    with pytest.raises(data.DataError, match="train-resized"):
        data.check_data_root(tmp_path / "nope")
    (tmp_path / "images" / "train-resized").mkdir(parents=True)
    with pytest.raises(data.DataError, match="labels/train"):
        data.check_data_root(tmp_path)
