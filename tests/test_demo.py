"""The demo data generator: layout, determinism, realism of shape, and learnability."""

import json

import numpy as np
import torch

import helpers as h
from cocochallenge import data, demo, metrics, models, training, transforms


def _files(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_deterministic_from_seed(tmp_path):
    a = demo.make_demo_data(tmp_path / "a", n_train=30, n_test=10, seed=7, progress=False)
    demo.make_demo_data(tmp_path / "b", n_train=30, n_test=10, seed=7, progress=False)
    demo.make_demo_data(tmp_path / "c", n_train=30, n_test=10, seed=8, progress=False)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb
    assert fa != fc
    assert len([k for k in fa if k.endswith(".cls")]) == 30
    assert sum(a["class_counts"]) == sum(
        len(t.decode().split()) for k, t in fa.items() if k.endswith(".cls")
    )
    # a complete set is recognised and not rewritten
    again = demo.make_demo_data(tmp_path / "a", n_train=30, n_test=10, seed=7, progress=False)
    assert again["class_counts"] == a["class_counts"] and _files(tmp_path / "a") == fa


def test_layout_and_shape(demo_root):
    paths = data.check_data_root(demo_root)
    train = h.COCOTrainImageDataset(paths["train_images"], paths["train_labels"])
    test = h.COCOTestImageDataset(paths["test_images"])
    answers = json.loads((demo_root / "test_labels.json").read_text())
    test_stems, train_stems = data.stems(test), data.stems(train)
    assert sorted(answers) == test_stems and not set(test_stems) & set(train_stems)
    assert not (paths["test_images"] / "test_labels.json").exists()
    Y = data.labels_of(train)
    per_image = Y.sum(1)
    assert per_image.min() >= 1 and per_image.max() <= 6 and 2.0 < per_image.mean() < 3.5
    counts = Y.sum(0)
    assert counts[0] > 0.35 * len(train) and counts[1:].max() < 0.2 * len(train)  # long tail
    sizes = [train[i][0].size for i in range(len(train))]
    assert all(max(s) == 224 and min(s) >= 59 for s in sizes)
    portrait = np.mean([hgt > w for w, hgt in sizes])
    assert 0.1 < portrait < 0.45 and len({min(s) for s in sizes}) > 10


def test_learnable_by_a_frozen_pretrained_backbone(tmp_path):
    root = tmp_path / "ms-coco"
    demo.make_demo_data(root, n_train=400, n_test=120, seed=1, progress=False)
    paths = data.data_paths(root)
    train = h.COCOTrainImageDataset(paths["train_images"], paths["train_labels"])
    model, pre = models.build_model("efficientnet_lite0", pretrained=True)
    t = transforms.build_transform({**pre, "size": 128})
    feats = {}
    for key, ds in (
        ("train", data.LabelledSubset(train, np.arange(len(train)), t)),
        ("test", h.COCOTestImageDataset(paths["test_images"], t)),
    ):
        loader = torch.utils.data.DataLoader(ds, batch_size=64)
        feats[key] = training.extract_features(
            model.backbone, loader, torch.device("cpu"), show_progress=False
        ).float()
    answers = json.loads((root / "test_labels.json").read_text())
    y_test = np.zeros((len(answers), 80), np.uint8)
    for i, s in enumerate(sorted(answers)):
        y_test[i, answers[s]] = 1
    torch.manual_seed(0)
    head = torch.nn.Linear(feats["train"].shape[1], 80)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-3)
    y = torch.from_numpy(data.labels_of(train)).float()
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(feats["train"]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        probs = torch.sigmoid(head(feats["test"])).numpy()
    m = metrics.mean_average_precision(y_test, probs)
    chance = y_test.mean(0)[y_test.any(0)].mean()  # mAP of a score with no information
    print(f"\ndemo learnability: test mAP {m:.3f} vs chance {chance:.3f}")
    assert m > 0.25 and m > 5 * chance
