"""The comparison of networks: scores with intervals, paired over the same validation images.

A difference between two networks measured on a few hundred validation images is a claim
about those images. To say whether it is beyond noise, every network is scored on the same
bootstrap resamples of the validation images (the rows of ``W``: how many times each image
is drawn), so that an image that is hard for all of them moves all their scores together, and
the difference of two networks gets its own interval (the difference plus or minus 1.645
standard deviations of its resamples: 90%). A difference whose interval leaves out zero is
called beyond noise; one whose interval holds zero is not.

The course F1 here is held out: each validation image is predicted with per-class thresholds
tuned on the other half of the images (:func:`cross_fitted`), over several random halvings;
tuned and scored on the same images it would flatter every network, the rare classes most.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .config import CLASSES
from .metrics import apply_thresholds, random_halves, shrunk_thresholds

#: The interval: 90%, the estimate plus or minus 1.645 standard deviations of its resamples.
#: Not the resamples' own percentiles: on a small set a resample that leaves out a rare class
#: the network misses drops that class's heavy weight, so resampled course F1s run higher
#: than the set's own, and their percentiles can miss the estimate altogether.
LEVEL, Z = 0.90, 1.645


def resamples(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """``(n_boot, n)`` multiplicities of ``n_boot`` bootstrap resamples of ``n`` images."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    # one bincount over row-offset draws: the same counts as np.add.at, which took 0.8 s here
    # for 1,000 x 6,500 (0.05 s this way)
    draws += np.arange(n_boot)[:, None] * n
    return np.bincount(draws.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float32)


def cross_fitted(y: np.ndarray, probs: np.ndarray, shrink: float = 10.0, at_least_one: bool = True,
                 repeats: int = 5, seed: int = 0) -> list[np.ndarray]:  # fmt: skip
    """Held-out binary predictions of every image, one matrix per random halving.

    In each halving, the thresholds tuned on one half (per class, shrunk toward the global
    one, as the submission's) predict the other half, and the other way round, so that no
    image is predicted with thresholds it helped to choose.
    """
    y = np.asarray(y).astype(bool)
    out = []
    for k, (a, b) in enumerate(random_halves(len(y), repeats, seed)):
        if k % 2:  # random_halves yields each halving both ways: one matrix per halving
            continue
        pred = np.zeros_like(y)
        for tune, score in ((a, b), (b, a)):
            t = shrunk_thresholds(y[tune], probs[tune], shrink)
            pred[score] = apply_thresholds(probs[score], t, at_least_one)
        out.append(pred)
    return out


def held_out_course_f1(
    y: np.ndarray, probs: np.ndarray, shrink: float = 10.0, at_least_one: bool = True,
    repeats: int = 5, seed: int = 0,
) -> float:  # fmt: skip
    """The held-out course F1: every image predicted with thresholds tuned on the other half
    (:func:`cross_fitted`), averaged over the halvings. The one score both notebooks compare
    and choose with; the bootstrap's point estimate (:func:`compare`) is the same number."""
    from .metrics import course_f1

    preds = cross_fitted(y, probs, shrink, at_least_one, repeats, seed)
    return float(np.mean([course_f1(y, p)["f1"] for p in preds]))


def _course_f1(tp: np.ndarray, fp: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The course metric of each row of counts ``(B, C)`` (metrics.course_scores, vectorised)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(tp > 0, tp / (tp + fp), 0.0)
        rec = np.where(tp > 0, tp / np.maximum(pos, 1e-12), 0.0)
        w = np.where(pos > 0, 1.0 / np.maximum(pos, 1e-12), 0.0)
        w = w / w.sum(1, keepdims=True)
        P, R = (prec * w).sum(1), (rec * w).sum(1)
        return np.where((P > 0) & (R > 0), 2 * P * R / (P + R), 0.0)


def _macro_f1(tp: np.ndarray, fp: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Macro F1 over the classes with positives in each row (metrics.evaluate_predictions')."""
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = 2 * tp + fp + (pos - tp)
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0)
    has = pos > 0
    return (f1 * has).sum(1) / np.maximum(has.sum(1), 1)


def weighted_map(y: np.ndarray, probs: np.ndarray, W: np.ndarray) -> np.ndarray:
    """mAP of each resample (row of ``W``): AP per class over the classes with positives.

    The average precision of a weighted ranking: each positive, counted as many times as it
    is drawn, contributes the precision at its rank. Equal to scikit-learn's
    ``average_precision_score`` for untied scores.

    Only the ranks of the positives matter, so per class (images ranked by score, ties in
    index order) the negatives are summed per gap between two consecutive positives, all
    resamples at once with one sparse product, and the precision at the k-th positive is
    (its hits so far) / (those + the negatives of the first k gaps): ``(resamples x
    positives)`` numbers per class instead of ``(resamples x images)`` cumulative sums. At
    1,000 resamples of 6,500 images, 80 classes: 0.65 s per model against 8 s before, the
    step that made a comparison of three networks take 50 s.
    """
    from scipy import sparse

    y = np.asarray(y).astype(bool)
    n = len(y)
    Wt = np.ascontiguousarray(np.asarray(W, dtype=np.float32).T)  # (images, resamples)
    aps = np.full((Wt.shape[1], y.shape[1]), np.nan)
    for c in np.flatnonzero(y.any(0)):
        order = np.argsort(-probs[:, c], kind="stable")
        pos = y[order, c]
        gap = (np.cumsum(pos) - pos)[~pos]  # per negative, in rank order: positives above it
        npos = int(pos.sum())
        indptr = np.concatenate([[0], np.cumsum(np.bincount(gap, minlength=npos + 1))])
        gaps = sparse.csr_matrix(
            (np.ones(len(gap), np.float32), order[~pos], indptr), shape=(npos + 1, n)
        )
        neg_above = np.cumsum(np.asarray(gaps @ Wt, dtype=np.float64), axis=0)[:npos]
        hits = Wt[order[pos]].astype(np.float64)  # (positives in rank order, resamples)
        cum_hits = np.cumsum(hits, axis=0)
        total = cum_hits[-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(cum_hits > 0, cum_hits / (cum_hits + neg_above), 0.0)
            aps[:, c] = np.where(total > 0, (hits * precision).sum(0) / total, np.nan)
    return np.nanmean(aps, axis=1)


def scores(y: np.ndarray, preds: list[np.ndarray], probs: np.ndarray | None,
           W: np.ndarray) -> dict:  # fmt: skip
    """Course F1 and macro F1 (averaged over the prediction matrices) and mAP, per resample."""
    y = np.asarray(y).astype(np.float32)
    count = lambda x: (W @ x).astype(np.float64)  # noqa: E731 (whole counts: exact in float32)
    pos = count(y)
    course, macro = [], []
    for p in preds:
        p = np.asarray(p).astype(np.float32)
        tp, fp = count(y * p), count((1 - y) * p)
        course.append(_course_f1(tp, fp, pos))
        macro.append(_macro_f1(tp, fp, pos))
    out = {"course F1": np.mean(course, 0), "macro F1": np.mean(macro, 0)}
    if probs is not None:
        out["mAP"] = weighted_map(y, probs, W)
    return out


def compare(y: np.ndarray, models: dict, n_boot: int = 1000, seed: int = 0,
            reference: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """``(table, differences)`` of the models on the same validation images.

    ``models`` maps a name to ``{"preds": [binary matrices], "probs": scores or None}``.
    ``table``: each score with its 90% interval (columns ``<score>``, ``<score> lo``,
    ``<score> hi``). ``differences``: each model minus ``reference`` (default: the best
    course F1), per resample, with its interval and ``beyond noise`` when it leaves out 0.
    Intervals are the estimate plus or minus ``Z`` standard deviations of the resamples.
    """
    W = resamples(len(y), n_boot, seed)
    full = np.ones((1, len(y)), dtype=np.float32)
    point = {m: {k: float(v[0]) for k, v in scores(y, d["preds"], d["probs"], full).items()}
             for m, d in models.items()}  # fmt: skip
    draws = {m: scores(y, d["preds"], d["probs"], W) for m, d in models.items()}
    rows = {}
    for m in models:
        row = {}
        for key, value in point[m].items():
            half = Z * float(np.std(draws[m][key]))
            row[key], row[f"{key} lo"], row[f"{key} hi"] = value, value - half, value + half
        rows[m] = row
    table = pd.DataFrame(rows).T
    reference = reference or table["course F1"].idxmax()
    diffs = {}
    for m in models:
        if m == reference:
            continue
        row = {}
        for key in ("course F1", "mAP"):
            if key not in draws[m] or key not in draws[reference]:
                continue
            half = Z * float(np.std(draws[m][key] - draws[reference][key]))
            row[key] = point[m][key] - point[reference][key]
            row[f"{key} lo"], row[f"{key} hi"] = row[key] - half, row[key] + half
            row[f"{key} beyond noise"] = bool(row[f"{key} lo"] > 0 or row[f"{key} hi"] < 0)
        diffs[f"{m} - {reference}"] = row
    return table, pd.DataFrame(diffs).T


def class_wins(y: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, n: int = 5) -> pd.DataFrame:
    """The classes where network a beats b by the most average precision, and the other way.

    AP needs no threshold, so a class's difference is the networks' ranking of its images,
    not the luck of a cut. Each class shows its validation positives: a large difference on
    two positives says little.
    """
    from sklearn.metrics import average_precision_score

    y = np.asarray(y).astype(bool)
    rows = []
    for c in np.flatnonzero(y.any(0)):
        a = average_precision_score(y[:, c], probs_a[:, c])
        b = average_precision_score(y[:, c], probs_b[:, c])
        rows.append({"class": CLASSES[c], "positives": int(y[:, c].sum()), "AP a": a, "AP b": b,
                     "a - b": a - b})  # fmt: skip
    table = pd.DataFrame(rows).sort_values("a - b", ascending=False, kind="stable")
    return pd.concat({"a better": table.head(n), "b better": table.tail(n)[::-1]})


def expected_course_f1(y: np.ndarray, probs: np.ndarray, n: int, shrink: float = 10.0,
                       at_least_one: bool = True, folds: int = 5, draws: int = 2000,
                       seed: int = 0) -> dict:  # fmt: skip
    """The course F1 to expect on a test set of ``n`` new images, and its 10-90% range.

    ``probs`` are held-out scores of the labelled images (out-of-fold, or a validation split's):
    no model saw the image it scores. Each fold's images are predicted with thresholds tuned on
    the other folds (the submission's rule), so no image is scored with thresholds it chose;
    then ``draws`` random sets of ``n`` images (without replacement, unless ``n`` exceeds them)
    are scored. On 678 real photos, against hidden test sets drawn like them, this estimate was
    0.03 below the hidden mean on average (its models learnt from 80% of the images) and its
    range held the hidden scores, where one validation split's F1 ranged 0.40 to 0.56 (README,
    "The offline CPU recipe").
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    y = np.asarray(y).astype(bool)
    pred = np.zeros_like(y)
    kfold = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for tune, score in kfold.split(np.zeros(len(y)), y):
        t = shrunk_thresholds(y[tune], probs[tune], shrink)
        pred[score] = apply_thresholds(probs[score], t, at_least_one)
    rng = np.random.default_rng(seed)
    W = np.zeros((draws, len(y)), dtype=np.float32)
    for row in W:  # sets of n different images; more test images than labelled: with repeats
        if n <= len(y):
            row[rng.choice(len(y), n, replace=False)] = 1.0
        else:
            np.add.at(row, rng.integers(0, len(y), n), 1.0)
    f1 = scores(y, [pred], None, W)["course F1"]
    lo, hi = np.percentile(f1, [10, 90])
    return {"expected": float(f1.mean()), "p10": float(lo), "p90": float(hi), "n": int(n)}
