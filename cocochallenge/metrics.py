"""Metrics: the leaderboard's F1 (the course's computation), standard metrics, thresholds.

The course metric weights each class by 1/positives, so rare classes dominate it: choosing
thresholds per class is the largest single gain, and also the easiest way to fool oneself
(thresholds scored on the images they were tuned on). Both sides are here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .config import CLASSES

if TYPE_CHECKING:
    import pandas as pd


def course_scores(tp, fp, positives) -> dict:
    """The course metric from per-class counts: weighted precision, recall and their F1.

    Per class, ``P_c = tp/(tp+fp)`` and ``R_c = tp/positives`` (both 0 when ``tp = 0``),
    averaged with weights proportional to ``1/positives_c``; F1 is the harmonic mean of the two
    averages. Where the course code divides by zero this returns a finite, documented value:
    classes with no positives get weight 0 (the course gives NaN for everything), and
    F1 is 0 when precision or recall is 0 (as the course's ``2/(1/P + 1/R)`` gives).
    """
    tp, fp, pos = (np.asarray(a, dtype=np.float64) for a in (tp, fp, positives))
    with np.errstate(divide="ignore", invalid="ignore"):
        prec_c = np.where(tp > 0, tp / (tp + fp), 0.0)
        rec_c = np.where(tp > 0, tp / np.where(pos > 0, pos, 1), 0.0)
        w = np.where(pos > 0, 1.0 / np.where(pos > 0, pos, 1), 0.0)
    if w.sum() == 0:
        prec = rec = f1 = 0.0
    else:
        w = w / w.sum()
        prec, rec = float((prec_c * w).sum()), float((rec_c * w).sum())
        f1 = 0.0 if prec == 0 or rec == 0 else 2.0 / (1.0 / prec + 1.0 / rec)
    return {
        "f1": f1,
        "precision": prec,
        "recall": rec,
        "accuracy": float(tp.sum() / pos.sum()) if pos.sum() > 0 else 0.0,
        "class_precision": prec_c,
        "class_recall": rec_c,
    }


def course_f1(targets: np.ndarray, pred: np.ndarray) -> dict:
    """Course metric (F1, precision, recall) of binary predictions ``(N, C)`` against targets."""
    y, p = np.asarray(targets).astype(bool), np.asarray(pred).astype(bool)
    out = course_scores((y & p).sum(0), (~y & p).sum(0), y.sum(0))
    return {k: out[k] for k in ("f1", "precision", "recall")}


def apply_thresholds(probs: np.ndarray, thresholds, at_least_one: bool = False) -> np.ndarray:
    """Binary predictions ``probs > thresholds`` (a scalar or one per class).

    ``at_least_one`` also gives every image its most probable class: every COCO image shows
    at least one object, and an empty prediction is a guaranteed miss.
    """
    # compared in float64: a cut between two adjacent float32 scores, cast to float32,
    # would round onto the upper score and the strict ">" would then drop that image
    probs = np.asarray(probs)
    pred = probs.astype(np.float64, copy=False) > np.asarray(thresholds, dtype=np.float64)
    if at_least_one and len(probs):
        pred[np.arange(len(probs)), probs.argmax(1)] = True
    return pred


def mean_average_precision(targets: np.ndarray, probs: np.ndarray) -> float:
    """Macro mAP over the classes that have positives (AP is undefined without any)."""
    from sklearn.metrics import average_precision_score

    y = np.asarray(targets).astype(bool)
    keep = y.any(0)
    if not keep.any():
        return 0.0
    return float(average_precision_score(y[:, keep], np.asarray(probs)[:, keep], average="macro"))


def evaluate_predictions(
    targets: np.ndarray, probs: np.ndarray, thresholds=0.5, at_least_one: bool = False
) -> dict:
    """Course F1 (with its P and R), macro and micro F1 and mAP, from probabilities.

    Macro F1 averages over the classes with positives in ``targets`` (sklearn's
    ``average='macro'`` on those labels): on a small split a class with no positive and no
    prediction would otherwise count as a 0 and say nothing about the model.
    """
    from sklearn.metrics import f1_score

    y = np.asarray(targets).astype(bool)
    pred = apply_thresholds(probs, thresholds, at_least_one)
    labels = np.flatnonzero(y.any(0))
    out = course_f1(y, pred)
    return {
        "course_f1": out["f1"],
        "precision": out["precision"],
        "recall": out["recall"],
        "macro_f1": float(f1_score(y, pred, average="macro", labels=labels, zero_division=0))
        if len(labels)
        else 0.0,
        "micro_f1": float(f1_score(y, pred, average="micro", zero_division=0)),
        "mAP": mean_average_precision(y, probs),
        "labels_per_image": float(pred.sum(1).mean()) if len(pred) else 0.0,
    }


def per_class_table(
    targets: np.ndarray,
    probs: np.ndarray,
    thresholds=0.5,
    at_least_one: bool = False,
    train_counts=None,
) -> pd.DataFrame:
    """One row per class: support, predictions, precision, recall, F1, AP and the threshold.

    The predictions are those the submission makes (``at_least_one`` as in the run), so the
    rows average (weights 1/support) to the course precision and recall of the comparison
    table. Precision, recall and F1 are scikit-learn's (0 where undefined); AP is NaN for a
    class without positives. ``train_counts`` adds the training images per class.
    """
    import pandas as pd
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support

    y = np.asarray(targets).astype(bool)
    probs = np.asarray(probs)
    pred = apply_thresholds(probs, thresholds, at_least_one)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, average=None, zero_division=0
    )
    ap = [
        average_precision_score(y[:, c], probs[:, c]) if support[c] else np.nan
        for c in range(y.shape[1])
    ]
    thr = np.broadcast_to(np.asarray(thresholds, dtype=float), (y.shape[1],))
    table = pd.DataFrame(
        {
            "class": CLASSES[: y.shape[1]],
            "support": support,
            "predicted": pred.sum(0),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "ap": ap,
            "threshold": thr,
        }
    )
    if train_counts is not None:
        table.insert(1, "train images", np.asarray(train_counts).astype(int))
    return table


#: The thresholds a single global threshold is searched over (per-class ones stay in this range).
THRESHOLD_GRID = np.arange(0.02, 0.981, 0.01)


def best_global_threshold(
    targets: np.ndarray, probs: np.ndarray, grid=THRESHOLD_GRID
) -> tuple[float, float]:
    """The single threshold with the best course F1 on these scores: ``(threshold, f1)``.

    Scores above each cut (compared in float64, as :func:`apply_thresholds` does) are
    counted from each class's sorted scores, not by thresholding the whole matrix once per
    grid value: the same counts, 97 binary matrices fewer (3,250 x 80 scores: 47 ms -> 17 ms
    here; threshold tuning calls this hundreds of times in the analysis).
    """
    y = np.asarray(targets).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    predicted, tp = _counts_above(y, probs, grid)
    scores = [course_scores(t, p - t, y.sum(0))["f1"] for t, p in zip(tp, predicted)]
    i = int(np.argmax(scores))
    return float(grid[i]), float(scores[i])


def _counts_above(y: np.ndarray, probs: np.ndarray, cuts: np.ndarray) -> tuple:
    """``(predicted, tp)``, each ``(len(cuts), C)``: images, and positives, scored above a cut."""
    n = len(probs)
    order = np.argsort(probs, axis=0, kind="stable")
    ranked = np.take_along_axis(probs, order, 0)
    pos_below = np.concatenate(  # positives among the k lowest scores, k = 0..n
        [np.zeros((1, y.shape[1]), np.int64), np.cumsum(np.take_along_axis(y, order, 0), 0)]
    )
    at_most = np.stack([np.searchsorted(ranked[:, c], cuts, side="right")
                        for c in range(y.shape[1])], 1)  # fmt: skip
    tp = pos_below[-1] - np.take_along_axis(pos_below, at_most, 0)
    return n - at_most, tp


def per_class_thresholds(
    targets: np.ndarray,
    probs: np.ndarray,
    min_positives: int = 5,
    fallback: float | None = None,
    bounds=(0.02, 0.98),
) -> np.ndarray:
    """One threshold per class, each maximising that class's F1 on validation scores.

    Rare classes weigh most in the course metric, and their best threshold is usually far
    below 0.5: public work measured about +30% relative F1 from this step. A class with fewer
    than ``min_positives`` validation positives would get a threshold fitted to one or two
    images, so it gets ``fallback`` (default: the best global threshold) instead. The F1 of
    every cut (each distinct score) comes from exact counts on the sorted scores, the counts of
    scikit-learn's ``precision_recall_curve`` (which cost 54 ms for 3,250 x 80 scores against
    9 ms); among equal F1 the highest cut wins (fewest predictions). The cut is placed
    half-way between the chosen score and the next lower one (in float64: see
    :func:`apply_thresholds`), and kept inside ``bounds``.
    """
    y = np.asarray(targets).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    if fallback is None:
        fallback = best_global_threshold(y, probs)[0]
    out = np.full(y.shape[1], float(fallback))
    # each class's scores in decreasing order (one argsort for all classes); a cut at each
    # distinct score predicts the images down to its last copy
    order = np.argsort(probs, axis=0, kind="stable")[::-1]
    ranked = np.take_along_axis(probs, order, 0)
    hits = np.cumsum(np.take_along_axis(y, order, 0), 0)
    for c in range(y.shape[1]):
        pos = int(hits[-1, c]) if len(y) else 0
        if pos < min_positives or not len(y):
            continue
        last = np.flatnonzero(np.append(np.diff(ranked[:, c]) != 0, True))  # last of each value
        tp = hits[last, c]
        f1 = 2 * tp / (last + 1 + pos)  # exact counts: equal F1s compare equal
        i = int(np.argmax(f1))  # the first maximum: the highest cut among equal F1
        cut = ranked[last[i], c]
        below = ranked[last[i] + 1, c] if last[i] + 1 < len(y) else None  # next lower score
        cut = (below + cut) / 2 if below is not None else cut - 1e-6
        out[c] = float(np.clip(cut, *bounds))
    return out


def shrunk_thresholds(
    targets: np.ndarray, probs: np.ndarray, k: float = 10.0, global_threshold: float | None = None
) -> np.ndarray:
    """Per-class thresholds pulled toward the global one by how few positives each class has.

    ``t_c = (n_c * t_c_raw + k * t_global) / (n_c + k)``: a class with many positives keeps
    its own cut, one with a handful mostly takes the global threshold, with no hard cut-off.
    ``k = 0`` keeps each class's own cut. On 678 real photos with frozen EfficientNet-Lite0
    heads (tools/evidence), k = 10 scored within noise of one global threshold and of k = 0.
    """
    y = np.asarray(targets).astype(bool)
    g = best_global_threshold(y, probs)[0] if global_threshold is None else global_threshold
    raw = per_class_thresholds(y, probs, min_positives=1, fallback=g)
    if k == 0:  # its own cut; a class without positives (0 / 0 below) has the global one there
        return raw
    n = y.sum(0)
    return (n * raw + k * g) / (n + k)


def random_halves(n: int, repeats: int = 10, seed: int = 0):
    """``(tune, score)`` masks: ``repeats`` random halves of ``n`` rows, each used both ways."""
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        half = rng.permutation(n) < n // 2
        yield half, ~half
        yield ~half, half


#: Raw outputs thresholded at 0.5, as the course code does, equal probabilities above this.
COURSE_LOGIT_THRESHOLD_AS_PROB = 1 / (1 + math.exp(-0.5))
