"""The library's metric against the course's own code, the guarded cases, thresholds."""

import math

import numpy as np
import pytest
import torch
from course_reference import validation_loop as course_validation_loop
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import helpers as h
from cocochallenge import metrics
from cocochallenge.config import NUM_CLASSES

pytestmark = pytest.mark.quick


class Identity(nn.Module):
    def forward(self, x):
        return x


def _loader(n=300, seed=0, all_classes=True, one_hot=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, NUM_CLASSES, generator=g) * 2 - 1
    if one_hot:
        y = (torch.rand(n, NUM_CLASSES, generator=g) < 0.08).float()
        if all_classes:
            y[torch.arange(NUM_CLASSES), torch.arange(NUM_CLASSES)] = 1.0
        # correlate outputs with labels so that precision/recall are not trivial
        logits = logits + 2.5 * y
    else:
        y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        y[:NUM_CLASSES] = torch.arange(NUM_CLASSES)
    return DataLoader(TensorDataset(logits, y), batch_size=64)


@pytest.mark.parametrize(
    "multi_label,th,one_hot",
    [(True, 0.5, True), (True, 0.0, True), (True, 1.5, True), (False, 0.5, True)],
)
def test_validation_loop_matches_course(multi_label, th, one_hot):
    loader = _loader(seed=int(th * 10) + multi_label)
    crit = nn.BCEWithLogitsLoss()
    args = (loader, Identity(), crit, NUM_CLASSES, "cpu")
    kw = dict(multi_label=multi_label, th_multi_label=th, one_hot=one_hot, class_metrics=True)
    ours, ours_c = h.validation_loop(*args, **kw)
    ref, ref_c = course_validation_loop(*args, **kw)
    for key in ("loss", "accuracy", "f1", "precision", "recall"):
        assert float(ours[key]) == pytest.approx(float(ref[key]), rel=1e-5, abs=1e-7), key
    assert 0 < ours["f1"] < 1
    for a, b in zip(ours_c, ref_c):
        for key in ("f1", "precision", "recall"):
            assert a[key] == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7)


def test_validation_loop_single_label_indices_matches_course():
    loader = _loader(one_hot=False)
    crit = nn.CrossEntropyLoss()
    args = (loader, Identity(), crit, NUM_CLASSES, "cpu")
    ours = h.validation_loop(*args)
    ref = course_validation_loop(*args)
    for key in ("loss", "accuracy", "f1", "precision", "recall"):
        assert float(ours[key]) == pytest.approx(float(ref[key]), rel=1e-5, abs=1e-7)


def test_class_without_positives_is_finite_where_course_is_nan():
    loader = _loader(all_classes=False, n=40, seed=5)
    y = torch.cat([b[1] for b in loader])
    assert (y.sum(0) == 0).any(), "the case needs a class with no positive"
    args = (loader, Identity(), nn.BCEWithLogitsLoss(), NUM_CLASSES, "cpu")
    ref = course_validation_loop(*args, multi_label=True, one_hot=True)
    assert math.isnan(float(ref["f1"]))
    ours = h.validation_loop(*args, multi_label=True, one_hot=True)
    assert all(math.isfinite(float(ours[k])) for k in ("f1", "precision", "recall", "accuracy"))
    # the guarded value: classes without positives simply drop out of the weights
    present = (y.sum(0) > 0).numpy()
    logits = torch.cat([b[0] for b in loader]).numpy()
    sub = metrics.course_f1(y.numpy()[:, present], (logits > 0.5)[:, present])
    assert float(ours["f1"]) == pytest.approx(sub["f1"])


def test_validation_loop_keeps_the_probabilities_in_loader_order():
    loader = _loader(n=100, seed=2)
    args = (loader, Identity(), nn.BCEWithLogitsLoss(), NUM_CLASSES, "cpu")
    res = h.validation_loop(*args, multi_label=True, one_hot=True, keep_probs=True)
    logits = torch.cat([b[0] for b in loader])
    np.testing.assert_allclose(res["probs"], torch.sigmoid(logits).numpy(), rtol=1e-6)
    assert "probs" not in h.validation_loop(*args, multi_label=True, one_hot=True)


def test_zero_precision_and_no_positives_at_all():
    y = np.zeros((4, NUM_CLASSES), bool)
    y[:, 3] = True
    out = metrics.course_f1(y, np.zeros_like(y))
    assert out == {"f1": 0.0, "precision": 0.0, "recall": 0.0}
    empty = metrics.course_f1(np.zeros_like(y), y)
    assert empty["f1"] == 0.0


def test_course_f1_hand_computed():
    # class 0: 2 positives, predicted on 3 images with 2 hits -> P=2/3, R=1
    # class 1: 1 positive, predicted once, wrong -> P=0, R=0; weights 1/2 and 1 -> 1/3, 2/3
    y = np.zeros((4, NUM_CLASSES), bool)
    p = np.zeros_like(y)
    y[[0, 1], 0] = True
    p[[0, 1, 2], 0] = True
    y[3, 1] = True
    p[2, 1] = True
    out = metrics.course_f1(y, p)
    P, R = (2 / 3) / 3, 1 / 3
    assert out["precision"] == pytest.approx(P)
    assert out["recall"] == pytest.approx(R)
    assert out["f1"] == pytest.approx(2 * P * R / (P + R))


def test_at_least_one_gives_every_image_its_top_class():
    probs = np.full((3, NUM_CLASSES), 0.01)
    probs[0, 7] = 0.3
    probs[1, 2] = 0.9
    pred = metrics.apply_thresholds(probs, 0.5, at_least_one=True)
    assert pred.sum(1).tolist() == [1, 1, 1]
    assert pred[0, 7] and pred[1, 2]
    assert metrics.apply_thresholds(probs, 0.5).sum() == 1


def test_per_class_thresholds_beat_global_and_respect_guard():
    rng = np.random.default_rng(0)
    n = 2000
    y = rng.random((n, NUM_CLASSES)) < np.linspace(0.3, 0.001, NUM_CLASSES)
    # each class is well separated but at its own scale: one global threshold cannot fit all
    scale = np.linspace(0.9, 0.05, NUM_CLASSES)
    probs = np.clip(rng.random((n, NUM_CLASSES)) * scale * 0.5 + y * scale * 0.5, 0, 1)
    thr = metrics.per_class_thresholds(y, probs, min_positives=5)
    assert thr.shape == (NUM_CLASSES,) and ((thr >= 0.02) & (thr <= 0.98)).all()
    g, g_f1 = metrics.best_global_threshold(y, probs)
    few = y.sum(0) < 5
    assert few.any() and np.allclose(thr[few], g)
    assert metrics.course_f1(y, probs > thr)["f1"] > g_f1 + 0.05
    table = metrics.per_class_table(y, probs, thr)
    assert len(table) == NUM_CLASSES and list(table["threshold"]) == list(thr)


def test_per_class_table_equals_the_hand_written_counts_it_replaced():
    """scikit-learn's per-class precision, recall and F1 against the formulas the table used to
    compute itself (0 where undefined), with classes without positives or without predictions."""
    rng = np.random.default_rng(3)
    y = rng.random((150, NUM_CLASSES)) < np.linspace(0.3, 0.0, NUM_CLASSES)
    probs = np.clip(y * 0.3 + rng.random(y.shape) * 0.7, 0, 1)
    probs[:, 5] = 0.0  # a class nobody predicts
    pred = probs > 0.6
    tp, fp, pos = (y & pred).sum(0), (~y & pred).sum(0), y.sum(0)
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    recall = np.where(pos > 0, tp / np.maximum(pos, 1), 0.0)
    f1 = np.where(
        precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0
    )
    table = metrics.per_class_table(y, probs, 0.6)
    assert (pos == 0).any() and ((tp + fp) == 0).any()
    np.testing.assert_allclose(table["precision"], precision, atol=1e-12)
    np.testing.assert_allclose(table["recall"], recall, atol=1e-12)
    np.testing.assert_allclose(table["f1"], f1, atol=1e-12)
    assert list(table["support"]) == list(pos) and list(table["predicted"]) == list(pred.sum(0))


def test_evaluate_predictions_keys_and_map():
    rng = np.random.default_rng(1)
    y = rng.random((200, NUM_CLASSES)) < 0.1
    perfect = metrics.evaluate_predictions(y, y.astype(float))
    assert perfect["course_f1"] == pytest.approx(1.0)
    assert perfect["mAP"] == pytest.approx(1.0)
    assert perfect["macro_f1"] == pytest.approx(1.0)
    noise = metrics.evaluate_predictions(y, rng.random(y.shape))
    assert noise["mAP"] < 0.3


def test_timm_asymmetric_loss_is_the_mean_over_images_and_reduces_to_bce():
    """The notebook's ASL is timm's, averaged over images (``reduction="batchmean"``): without
    focusing and clipping it is the per-image sum of BCE, so its printed value does not depend
    on the batch size; with the paper's focusing it is smaller than BCE."""
    from timm.loss import AsymmetricLossMultiLabel

    torch.manual_seed(0)
    logits, y = torch.randn(8, NUM_CLASSES), (torch.rand(8, NUM_CLASSES) < 0.1).float()
    plain = AsymmetricLossMultiLabel(gamma_neg=0, gamma_pos=0, clip=0, reduction="batchmean")
    bce = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum") / 8
    assert float(plain(logits, y)) == pytest.approx(float(bce), rel=1e-4)
    asl = AsymmetricLossMultiLabel(gamma_pos=0, clip=0.05, reduction="batchmean")
    assert float(asl(logits[:4], y[:4])) + float(asl(logits[4:], y[4:])) == pytest.approx(
        2 * float(asl(logits, y)), rel=1e-5
    )
    assert float(asl(logits, y)) < float(bce)


def _pr_curve_thresholds(y, probs, min_positives, fallback, bounds=(0.02, 0.98)):
    """Per-class thresholds from scikit-learn's precision_recall_curve: the computation
    per_class_thresholds replaced (sorted counts give the same cuts, 3x faster)."""
    from sklearn.metrics import precision_recall_curve

    probs = np.asarray(probs, dtype=np.float64)
    out = np.full(y.shape[1], float(fallback))
    for c in range(y.shape[1]):
        pos = int(y[:, c].sum())
        if pos < min_positives:
            continue
        precision, recall, cuts = precision_recall_curve(y[:, c], probs[:, c])
        tp = np.rint(recall[:-1] * pos)
        predicted = np.rint(tp / np.where(precision[:-1] > 0, precision[:-1], 1))
        f1 = 2 * tp / (np.where(precision[:-1] > 0, predicted, 0) + pos)
        j = len(f1) - 1 - int(np.argmax(f1[::-1]))
        below = probs[:, c][probs[:, c] < cuts[j]]
        cut = (below.max() + cuts[j]) / 2 if len(below) else cuts[j] - 1e-6
        out[c] = float(np.clip(cut, *bounds))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_thresholds_equal_the_computations_they_replaced(seed):
    """Counted from sorted scores, the global and the per-class thresholds are exactly those of
    thresholding the matrix at each grid value and of precision_recall_curve: ties, classes
    with one positive or none, float32 scores, the guard."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = rng.random((n, NUM_CLASSES)) < rng.uniform(0.002, 0.4, NUM_CLASSES)
    probs = (rng.random(y.shape) * (0.5 + y)).clip(0, 1).astype(np.float32)
    if seed % 2:
        probs = np.round(probs, 1)  # many ties
    # class 1: two cuts of equal F1 (1 of 1 predicted right, 2 of 4): the higher one is kept
    y[:, 1], probs[:, 1] = False, 0.1
    y[:4, 1], probs[:4, 1] = [True, False, False, True], [0.9, 0.8, 0.7, 0.6]
    scores = [metrics.course_f1(y, probs > t)["f1"] for t in metrics.THRESHOLD_GRID]
    i = int(np.argmax(scores))
    assert metrics.best_global_threshold(y, probs) == (metrics.THRESHOLD_GRID[i], scores[i])
    for min_positives in (1, 5):
        got = metrics.per_class_thresholds(y, probs, min_positives, fallback=0.3)
        assert np.array_equal(got, _pr_curve_thresholds(y, probs, min_positives, 0.3))
        assert got[1] == (pytest.approx(0.85) if min_positives <= 2 else 0.3)


def test_unshrunk_thresholds_keep_each_cut_and_the_global_one_for_a_class_without_positives():
    rng = np.random.default_rng(1)
    y = rng.random((200, NUM_CLASSES)) < 0.1
    y[:, 5] = False  # no positive: (0 * raw + 0 * global) / 0 would be NaN
    probs = np.clip(rng.random((200, NUM_CLASSES)) * 0.6 + y * 0.3, 0, 1)
    g = metrics.best_global_threshold(y, probs)[0]
    t = metrics.shrunk_thresholds(y, probs, k=0)
    assert np.isfinite(t).all() and t[5] == g
    assert np.allclose(t, metrics.per_class_thresholds(y, probs, min_positives=1, fallback=g))
