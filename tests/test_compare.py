"""The comparison of networks: its scores against the library's metric, its intervals, Grad-CAM."""

import numpy as np
import pytest
import torch

from cocochallenge import compare, metrics

pytestmark = pytest.mark.quick


def _data(n=120, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 80)) < np.geomspace(0.4, 0.02, 80)).astype(np.uint8)
    y[np.arange(80) % n, np.arange(80)] = 1
    logits = rng.normal(-2.0, noise, y.shape) + 2.5 * y
    return y, (1 / (1 + np.exp(-logits))).astype(np.float32)


def test_scores_on_the_whole_set_are_the_library_metrics():
    y, p = _data()
    pred = metrics.apply_thresholds(p, 0.3, at_least_one=True)
    full = np.ones((1, len(y)), np.float32)
    got = compare.scores(y, [pred], p, full)
    ref = metrics.evaluate_predictions(y, pred.astype(float), 0.5)
    assert got["course F1"][0] == pytest.approx(ref["course_f1"], abs=1e-9)
    assert got["macro F1"][0] == pytest.approx(ref["macro_f1"], abs=1e-9)
    assert got["mAP"][0] == pytest.approx(metrics.mean_average_precision(y, p), abs=1e-6)


def test_a_resample_scores_as_the_images_it_draws():
    """Weights of 2 on an image are that image twice: the scores of the duplicated set."""
    y, p = _data(60, seed=1)
    pred = metrics.apply_thresholds(p, 0.4)
    w = np.random.default_rng(2).integers(0, 3, len(y)).astype(np.float32)
    idx = np.repeat(np.arange(len(y)), w.astype(int))
    got = compare.scores(y, [pred], p, w[None, :])
    assert got["course F1"][0] == pytest.approx(
        metrics.course_f1(y[idx], pred[idx])["f1"], abs=1e-9
    )
    assert got["mAP"][0] == pytest.approx(metrics.mean_average_precision(y[idx], p[idx]), abs=1e-6)
    W = compare.resamples(50, 200, seed=0)
    assert W.shape == (200, 50) and (W.sum(1) == 50).all()


def test_cross_fitted_predictions_never_use_their_own_labels():
    """Each image's prediction comes from thresholds tuned on the other half: changing the
    labels of one half changes the predictions of the other half only."""
    y, p = _data(100, seed=3)
    a = compare.cross_fitted(y, p, repeats=1, seed=0)[0]
    half = next(iter(metrics.random_halves(len(y), 1, 0)))[0]
    y2 = y.copy()
    y2[half] = 1 - y2[half]
    b = compare.cross_fitted(y2, p, repeats=1, seed=0)[0]
    assert np.array_equal(a[half], b[half]) and not np.array_equal(a[~half], b[~half])


def test_the_expected_test_f1_predicts_new_test_sets_and_widens_on_small_ones():
    """From 400 labelled images' scores, the F1 to expect on 100 new images drawn alike: the
    mean of 200 such test sets, scored with thresholds tuned on the 400, lies in its range
    and near it; a set of 30 images scatters more than one of 200."""
    rng = np.random.default_rng(0)

    def draw(n):
        y = (rng.random((n, 80)) < np.geomspace(0.3, 0.01, 80)).astype(np.uint8)
        logits = rng.normal(-2.0, 1.5, y.shape) + 2.5 * y
        return y, (1 / (1 + np.exp(-logits))).astype(np.float32)

    y, p = draw(400)
    t = metrics.shrunk_thresholds(y, p, 10.0)
    new = [metrics.course_f1(y2, metrics.apply_thresholds(p2, t, True))["f1"]
           for y2, p2 in (draw(100) for _ in range(200))]  # fmt: skip
    est = compare.expected_course_f1(y, p, 100, draws=400)
    assert est["p10"] < np.mean(new) < est["p90"] and abs(est["expected"] - np.mean(new)) < 0.05
    small = compare.expected_course_f1(y, p, 30, draws=400)
    large = compare.expected_course_f1(y, p, 200, draws=400)
    assert small["p90"] - small["p10"] > large["p90"] - large["p10"] + 0.03
    more = compare.expected_course_f1(y, p, 2000, draws=200)  # more test images than labelled
    assert more["n"] == 2000 and 0 < more["p90"] - more["p10"] < large["p90"] - large["p10"]


def test_differences_are_paired_and_say_when_they_are_noise():
    y, p = _data(150, seed=4)
    sharper = np.clip(p + 0.4 * (y - 0.5), 0, 1)  # clearly better on every class
    same = p.copy()
    models = {m: {"preds": compare.cross_fitted(y, q, repeats=2), "probs": q}
              for m, q in (("base", p), ("same", same), ("better", sharper))}  # fmt: skip
    table, diffs = compare.compare(y, models, n_boot=300, seed=0)
    assert table["course F1"].idxmax() == "better"
    for key in ("course F1", "mAP"):
        assert (table[f"{key} lo"] <= table[key]).all() and (table[key] <= table[f"{key} hi"]).all()
    assert diffs.loc["base - better", "course F1 beyond noise"]
    _, vs_base = compare.compare(y, models, n_boot=300, seed=0, reference="base")
    row = vs_base.loc["same - base"]  # the same scores: a difference of exactly 0, no noise
    assert row["course F1"] == 0 and row["course F1 lo"] == 0 == row["course F1 hi"]
    assert not row["course F1 beyond noise"]


def test_class_wins_rank_by_average_precision():
    y, p = _data(100, seed=5)
    q = p.copy()
    q[:, 0] = 1.0 - p[:, 0]  # b ranks class 0 backwards
    wins = compare.class_wins(y, p, q, n=3)
    assert wins.loc["a better"].iloc[0]["class"] == "person"
    assert (wins.loc["a better"]["a - b"] >= 0).all() and len(wins) == 6
    assert wins.loc["a better"].iloc[0]["positives"] == y[:, 0].sum()


def test_grad_cam_finds_the_region_the_class_depends_on():
    """A tiny network whose class 3 is the mean of the image's left half: the map is there."""
    from cocochallenge import analysis, models

    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn2 = torch.nn.Identity()  # where cam_layer looks in a timm backbone

        def forward(self, x):
            return self.bn2(x).mean((2, 3))

    head = torch.nn.Linear(3, 80)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[3, 0] = 1.0
    model = models.MultiLabelNet(Backbone(), torch.nn.Sequential(head))
    x = torch.zeros(2, 3, 8, 8)
    x[:, 0, :, :4] = 1.0  # channel 0 lit on the left half only
    cam = analysis.grad_cam(model, x, [3, 3])
    assert cam.shape == (2, 8, 8) and cam.max() == pytest.approx(1.0)
    assert cam[:, :, :4].mean() > 0.9 and cam[:, :, 4:].mean() < 0.1


def _ranked_map(y, probs, W):
    """mAP of each resample by its definition: each class's images ranked by score (ties in
    index order), the precision at every position, weighted by the positives' multiplicities
    (the computation weighted_map replaced, which took 8 s for 1,000 x 6,500)."""
    aps = np.full((len(W), y.shape[1]), np.nan)
    for c in np.flatnonzero(y.any(0)):
        order = np.argsort(-probs[:, c], kind="stable")
        w = W[:, order].astype(np.float64)
        hits = w * y[order, c]
        precision = np.divide(np.cumsum(hits, 1), np.cumsum(w, 1), where=np.cumsum(w, 1) > 0,
                              out=np.zeros_like(w))  # fmt: skip
        total = hits.sum(1)
        aps[:, c] = np.where(total > 0, (hits * precision).sum(1) / np.maximum(total, 1), np.nan)
    return np.nanmean(aps, axis=1)


def test_weighted_map_is_the_ranked_definition_with_ties_and_undrawn_images():
    """The per-gap sums give every resample the mAP of its ranking: ties broken in index order,
    images drawn 0 to several times, a class whose positives a resample leaves all out."""
    y, p = _data(90, seed=6)
    p = np.round(p, 1)  # many ties, positives and negatives mixed within them
    y[:, 79] = 0
    y[[3, 40], 79] = 1  # a class with two positives: left out by some resamples
    W = compare.resamples(len(y), 60, seed=1)
    W[0] = 0
    W[0, :45] = 2  # a resample without the second positive of class 79
    got, ref = compare.weighted_map(y, p, W), _ranked_map(y.astype(bool), p, W)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


def test_resamples_count_each_draw_of_the_generator():
    """The multiplicities are the counts of ``rng.integers(0, n, (n_boot, n))``, as drawn with
    ``np.add.at`` before: the same seed gives the same resamples, hence the same intervals."""
    n, n_boot, seed = 37, 25, 3
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    ref = np.zeros((n_boot, n), np.float32)
    np.add.at(ref, (np.repeat(np.arange(n_boot), n), draws.ravel()), 1.0)
    W = compare.resamples(n, n_boot, seed)
    assert W.dtype == np.float32 and np.array_equal(W, ref)
