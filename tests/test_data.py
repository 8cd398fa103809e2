"""Label parsing, the course datasets, the stratified split and the transforms."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import helpers as h
from cocochallenge import config, data, files, models, scan, split, training, transforms
from conftest import write_labels

pytestmark = pytest.mark.quick


def _layout(tmp_path, rows, size=(40, 30)):
    root = tmp_path / "ms-coco"
    write_labels(root / "labels" / "train", rows)
    (root / "images" / "train-resized").mkdir(parents=True)
    for stem in rows:
        Image.new("RGB", size, (10, 20, 30)).save(root / "images" / "train-resized" / f"{stem}.jpg")
    return root


def test_labels_parsed_once_into_matrix(tmp_path):
    root = _layout(tmp_path, {"000000000002": [5, 1], "000000000001": [0]})
    (root / "labels/train/000000000003.cls").write_text("3\r\n\r\n7\r\n3\n")  # CRLF, blank, dup
    Image.new("L", (20, 50)).save(root / "images/train-resized/000000000003.jpg")
    ds = h.COCOTrainImageDataset(root / "images/train-resized", root / "labels/train")
    assert data.stems(ds) == ["000000000001", "000000000002", "000000000003"]
    Y = data.labels_of(ds)
    assert Y.dtype == np.uint8 and Y.shape == (3, 80)
    assert np.flatnonzero(Y[1]).tolist() == [1, 5]
    assert np.flatnonzero(Y[2]).tolist() == [3, 7]
    img, target = ds[2]  # a grayscale image simply works, and the course's item agrees
    assert img.mode == "RGB" and target.dtype == torch.float32
    assert np.flatnonzero(target.numpy()).tolist() == [3, 7]


@pytest.mark.parametrize(
    "content,line,what",
    [
        ("3\nfoo\n", 2, "not a class index"),
        ("80\n", 1, "outside 0..79"),
        ("1\n-1\n", 2, "outside 0..79"),
        ("2.5\n", 1, "not a class index"),
    ],
)
def test_malformed_label_names_file_and_line(tmp_path, content, line, what):
    root = _layout(tmp_path, {"000000000001": [0], "000000000002": [1]})
    (root / "labels/train/000000000002.cls").write_text(content)
    ds = h.COCOTrainImageDataset(root / "images/train-resized", root / "labels/train")
    with pytest.raises(data.DataError) as err:
        data.labels_of(ds)
    msg = str(err.value)
    assert "000000000002.cls" in msg and f"line {line}" in msg and what in msg


def test_a_label_file_reads_the_same_in_the_check_and_in_the_feature_pass(tmp_path):
    """A byte-order mark (Notepad's), CRLF, spaces and tabs: the data check and the course's
    dataset read the same classes, and the feature pass goes through every item."""
    rows = {f"00000000000{i}": [0] for i in range(1, 5)}
    root = _layout(tmp_path, rows)
    labels = root / "labels/train"
    (labels / "000000000001.cls").write_bytes(b"\xef\xbb\xbf45\n3\n")
    (labels / "000000000002.cls").write_bytes(b"45 \r\n3\t\r\n\r\n")
    (labels / "000000000003.cls").write_bytes(b"\xef\xbb\xbf 3\r\n45   ")
    ds = h.COCOTrainImageDataset(root / "images/train-resized", labels)
    Y = data.labels_of(ds)
    assert [np.flatnonzero(y).tolist() for y in Y] == [[3, 45]] * 3 + [[0]]
    view = data.LabelledSubset(ds, range(len(ds)), transforms.build_transform(
        {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}))  # fmt: skip
    loader = transforms.make_loader(view, batch_size=2, train=False, workers=0)
    pooled = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    feats = training.extract_features(pooled, loader, "cpu", show_progress=False)
    assert feats.shape == (4, 3)
    assert torch.equal(torch.stack([t for _, t in view]), torch.from_numpy(Y).float())


def test_a_label_line_the_dataset_cannot_read_is_refused_by_the_check(tmp_path):
    """A form feed splits a line for str.splitlines, not for a text file: the check reads the
    file as the dataset does, and names it, before training."""
    root = _layout(tmp_path, {"000000000001": [0], "000000000002": [1]})
    (root / "labels/train/000000000002.cls").write_text("3\x0c17\n")
    ds = h.COCOTrainImageDataset(root / "images/train-resized", root / "labels/train")
    with pytest.raises(ValueError):
        ds[1]  # what the feature pass would meet
    with pytest.raises(data.DataError, match="000000000002.cls, line 1"):
        data.labels_of(ds)


def test_a_16_bit_grayscale_png_named_jpg_is_scaled_to_8_bits(tmp_path):
    """PIL's own conversion clips 16-bit values at 255 (a photo turns white): the datasets,
    load_rgb and the scan's note all scale it to 8 bits."""
    rows = {"000000000001": [0], "000000000002": [1]}
    root = _layout(tmp_path, rows)
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint16), (30, 1))  # 64 levels, 0..252
    path = root / "images/train-resized/000000000002.jpg"
    Image.fromarray(gray * 257).save(path, format="PNG")  # 16 bits: 0..64764
    Image.fromarray(gray * 257).save(root / "test.jpg", format="PNG")
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # what Pillow reads a 16-bit PNG as
    expected = np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)
    ds = h.COCOTrainImageDataset(root / "images/train-resized", root / "labels/train")
    test = h.COCOTestImageDataset(root)
    for image in (ds[1][0], test[0][0], data.load_rgb(path)):
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected)
    problem, note = scan.check_image_file(path)
    assert problem is None and "16-bit grayscale: scaled to 8 bits" in note


def test_empty_label_file_means_no_object(tmp_path):
    root = _layout(tmp_path, {"000000000001": [0], "000000000002": [4]})
    (root / "labels/train/000000000001.cls").write_text("\n")
    ds = h.COCOTrainImageDataset(root / "images/train-resized", root / "labels/train")
    Y = data.labels_of(ds)
    assert Y[0].sum() == 0 and Y[1, 4] == 1
    assert ds[0][1].sum() == 0 and ds[1][1][4] == 1  # the course's dataset, completed: no error


def test_max_images_and_test_dataset(demo_root):
    p = data.data_paths(demo_root)
    ds = h.COCOTrainImageDataset(p["train_images"], p["train_labels"], max_images=10)
    assert len(ds) == 10 and data.labels_of(ds).shape == (10, 80)
    test = h.COCOTestImageDataset(p["test_images"])
    img, stem = test[0]
    assert isinstance(stem, str) and len(stem) == 12 and img.mode == "RGB"
    assert len(test) == 40


def test_stratified_split_properties():
    rng = np.random.default_rng(0)
    prev = np.r_[0.5, np.geomspace(0.2, 0.002, 79)]
    Y = (rng.random((3000, 80)) < prev).astype(np.uint8)
    Y[Y.sum(1) == 0, 0] = 1
    Y[:2, 79] = 1  # a class with exactly 2 images
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
    rand_err = np.mean(
        [
            np.abs(
                Y[np.random.default_rng(s).permutation(len(Y))[: len(va)]].sum(0)[rare] - target
            ).mean()
            for s in range(5)
        ]
    )
    assert strat_err < 0.6 * rand_err, (strat_err, rand_err)
    again = split.stratified_split(Y, 0.2, seed=1)
    assert np.array_equal(again[0], tr) and np.array_equal(again[1], va)
    other = split.stratified_split(Y, 0.2, seed=2)
    assert not np.array_equal(other[1], va)


def test_split_file_is_reused_and_checked(tmp_path, demo_root):
    p = data.data_paths(demo_root)
    ds = h.COCOTrainImageDataset(p["train_images"], p["train_labels"])
    ds = (data.stems(ds), data.labels_of(ds))
    inv = {s: "1:0" for s in ds[0]}  # the inventory the split is made with
    path = tmp_path / "split.json"
    tr, va = split.load_or_make_split(*ds, path, 0.2, seed=0, inventory=inv)
    assert path.exists()
    tr2, va2 = split.load_or_make_split(*ds, path, 0.2, seed=0, inventory=inv)  # same: reused
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    files.save_json({}, tmp_path / "models/efficientnet_lite0/result.json")  # a model used it
    before = path.read_bytes()
    with pytest.raises(files.StaleRunError) as err:  # new settings never silently overridden
        split.load_or_make_split(*ds, path, 0.5, seed=99, inventory=inv)
    msg = str(err.value)
    assert (
        "seed: 0 -> 99" in msg
        and "val_fraction: 0.2 -> 0.5" in msg
        and "which efficientnet_lite0 trained on" in msg
        and "RUN_DIR" in msg
        and "retrain" in msg
    )
    assert path.read_bytes() == before
    with pytest.raises(files.StaleRunError, match="labelled images 1 added"):
        split.load_or_make_split(*ds, path, 0.2, seed=0, inventory={**inv, "x": "1:2"})
    small = (ds[0][:50], ds[1][:50])
    with pytest.raises(files.StaleRunError, match="the data has 50"):
        split.load_or_make_split(*small, path, 0.2, seed=0, inventory=inv)
    tr3, va3 = split.load_or_make_split(*ds, path, 0.5, seed=99, inventory=inv, replace=True)
    assert abs(len(va3) / len(ds[0]) - 0.5) < 0.05 and json.loads(path.read_text())["seed"] == 99


def test_a_split_no_trained_model_used_is_made_again_with_a_note(tmp_path, demo_root):
    """A failed try's split (the folder holds no checkpoint, no result) never blocks the next
    try: other settings make a new split, and one line says so."""
    p = data.data_paths(demo_root)
    ds = h.COCOTrainImageDataset(p["train_images"], p["train_labels"])
    ds = (data.stems(ds), data.labels_of(ds))
    inv = {s: "1:0" for s in ds[0]}
    path = tmp_path / "split.json"
    split.load_or_make_split(*ds, path, 0.2, seed=0, inventory=inv)
    (tmp_path / "models/efficientnet_lite0").mkdir(parents=True)  # settings and caches only:
    files.save_json({}, tmp_path / "models/efficientnet_lite0/settings.json")  # not trained
    lines = []
    tr, va = split.load_or_make_split(*ds, path, 0.25, seed=3, inventory=inv, log=lines.append)
    saved = json.loads(path.read_text())
    assert saved["val_fraction"] == 0.25 and saved["seed"] == 3 and len(va) == len(saved["val"])
    assert len(lines) == 1 and "made again" in lines[0] and "val_fraction: 0.2 -> 0.25" in lines[0]
    lines.clear()
    split.load_or_make_split(*ds, path, 0.25, seed=3, inventory=inv, log=lines.append)
    assert lines == []  # the same settings: reused, nothing said


def test_each_side_has_its_own_transform(demo_root):
    p = data.data_paths(demo_root)
    ds = h.COCOTrainImageDataset(p["train_images"], p["train_labels"])
    pre = {"size": 64, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    train_t, eval_t = (
        transforms.build_transform(pre, train=True),
        transforms.build_transform(pre, train=False),
    )
    tr = data.LabelledSubset(ds, np.arange(0, 10), train_t)
    va = data.LabelledSubset(ds, np.arange(10, 20), eval_t)
    assert tr.transform is train_t and va.transform is eval_t and ds.transform is None
    a, b = va[0][0], va[0][0]
    assert torch.equal(a, b)  # validation is deterministic
    assert a.shape == (3, 64, 64)
    assert isinstance(ds[0][0], Image.Image)  # the parent is untouched
    assert va.stems == data.stems(ds)[10:20]
    assert torch.equal(va[3][1], ds[13][1])
    with pytest.raises(ValueError, match="without a transform"):
        data.LabelledSubset(data.with_transform(ds, eval_t), np.arange(3), eval_t)


def test_padded_transform_keeps_aspect_and_pads_with_the_mean():
    """timm's ResizeKeepRatio + CenterCropOrPad: the long side fills the square, the rest is the
    normalisation mean, which becomes 0 after normalisation (bit-identical to the hand-written
    ResizePad it replaced, checked on 40 real photos at 160 and 224 px)."""
    img = Image.new("RGB", (224, 100), (255, 0, 0))
    pre = {"size": 112, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    x = transforms.build_transform(pre, pad=True)(img)
    assert x.shape == (3, 112, 112)
    assert x[0, 56, 56] == pytest.approx(1.0) and x[:, 0, 56].abs().max() < 0.01  # red, then pad
    rows = (x[0] > 0.9).any(1).sum()
    assert rows == 50  # 100/224 of 112 rows hold the image: the aspect is kept
    plain = transforms.build_transform({"size": 32, "mean": (0,) * 3, "std": (1,) * 3}, pad=False)
    assert plain(img).shape == (3, 32, 32) and (plain(img)[0] == 1).all()  # stretched


def test_settings_say_where_each_value_came_from(monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("COCO_")]:
        monkeypatch.delenv(key)
    cell = {
        "EPOCHS_FROZEN": 3,
        "BACKBONES": ["x"],
        "LR_HEAD": 0.1,
        "OPTIONS": {"at_least_one": False},
    }
    monkeypatch.setenv("COCO_EPOCHS_FROZEN", "7")
    monkeypatch.setenv("COCO_BACKBONES", "resnet50, efficientnet_lite0")
    cfg, source = config.settings(cell)
    assert cfg["epochs_frozen"] == 7 and cfg["backbones"] == ["resnet50", "efficientnet_lite0"]
    assert source["epochs_frozen"] == "environment variable COCO_EPOCHS_FROZEN"
    assert cfg["lr_head"] == 0.1 and source["lr_head"] == "parameters cell"
    assert cfg["at_least_one"] is False and source["at_least_one"] == "OPTIONS (parameters cell)"
    assert cfg["shrink"] == config.OPTIONS["shrink"] and source["shrink"].startswith(
        "library default"
    )
    assert cfg["workers"] == 0 and source["workers"] == "chosen for cpu"  # none on a CPU
    assert "options" not in cfg
    monkeypatch.setenv("COCO_OPTIONS", '{"workers": 0}')
    cfg, source = config.settings(cell)
    assert cfg["workers"] == 0 and cfg["at_least_one"] is True  # the variable replaces the dict
    assert source["workers"] == "OPTIONS (environment variable COCO_OPTIONS)"
    monkeypatch.setenv("COCO_LR_HEAD", "fast")
    with pytest.raises(ValueError, match="COCO_LR_HEAD"):
        config.settings(cell)
    monkeypatch.delenv("COCO_LR_HEAD")
    monkeypatch.delenv("COCO_OPTIONS")
    with pytest.raises(ValueError, match="unknown OPTIONS"):
        config.settings({**cell, "OPTIONS": {"shrink": 1, "typo": 2}})


def test_missing_data_root_explains_layout(tmp_path):
    with pytest.raises(data.DataError, match="train-resized"):
        data.check_data_root(tmp_path / "nope")
    (tmp_path / "images" / "train-resized").mkdir(parents=True)
    with pytest.raises(data.DataError, match="labels/train"):
        data.check_data_root(tmp_path)


def test_loaders_for_65000_ids_list_the_ids_once_per_view(monkeypatch):
    """The notebook's `loaders_for` at the course's size: each view reads the dataset's ids once,
    not once per image (65,000 path parses per image were three hours before the first batch)."""
    cell = next(c for c in _notebook_cells("challenge.ipynb") if "def loaders_for(" in c)
    n = 65_000
    base = h.COCOTrainImageDataset.__new__(h.COCOTrainImageDataset)
    base.img_labels = [f"{i:012d}.cls" for i in range(n)]
    base.img_dir = base.annotations_dir = "/nonexistent"
    base.transform = None
    test = h.COCOTestImageDataset.__new__(h.COCOTestImageDataset)
    test.img_list, test.img_dir, test.transform = ["000000000001.jpg"], "/nonexistent", None
    calls, real = [], data.stems

    def counted(dataset):  # fails at once where a per-image pass would take hours
        calls.append(1)
        assert len(calls) <= 10, "the dataset's 65,000 ids listed once per image"
        return real(dataset)

    monkeypatch.setattr(data, "stems", counted)
    cfg = {"pad": False, "workers": 0, "img_size": 32}
    namespace = dict(cfg=cfg, transforms=transforms, data=data, models=models, BATCH_SIZE=64,
                     AUGMENT="none", device=torch.device("cpu"), train_set=base, test_set=test,
                     train_idx=np.arange(6_500, n), val_idx=np.arange(6_500),
                     fit_idx=np.arange(6_500, 13_000))  # fmt: skip
    exec(compile(cell, "challenge.ipynb", "exec"), namespace)
    loaders = namespace["loaders_for"]("efficientnet_lite0")
    assert len(loaders["train"].dataset) == n - 6_500 and len(loaders["val"].dataset) == 6_500
    assert loaders["val"].dataset.stems[-1] == f"{6_499:012d}"
    assert len(calls) <= len(loaders), f"{len(calls)} passes over the 65,000 ids"


def _notebook_cells(name):
    from pathlib import Path

    nb = json.loads((Path(__file__).resolve().parents[1] / name).read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
