"""The readings printed under the notebooks' outputs, on synthetic scores whose truth is known.

Each test makes the case its reading must get right (a clearly better model, two equal ones,
over- and under-prediction, a class seen once, one network, no error) and checks the words;
reversing the reading (swapping a comparison, an axis, a filter) fails it. The six readings the
hand-written prose once got wrong each have a test here (named ``..._once_misread``).
"""

import numpy as np
import pandas as pd
import pytest

from cocochallenge import analysis, compare, plots, readings
from cocochallenge.config import CLASSES

pytestmark = pytest.mark.quick


def _labels(n=300, classes=12, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, classes)) < 0.2).astype(np.uint8)
    y[np.arange(n), rng.integers(0, classes, n)] = 1  # every image has a label
    return y


def _scores(y, skill, seed):
    """Probabilities that rank positives above negatives with ``skill`` (0: random)."""
    rng = np.random.default_rng(seed)
    return np.clip(skill * y + (1 - skill) * rng.random(y.shape), 0, 1).astype(np.float32)


def _compared(models_probs, y, n_boot=300):
    models = {m: {"preds": compare.cross_fitted(y, p), "probs": p} for m, p in models_probs.items()}
    return compare.compare(y, models, n_boot)


def test_ranking_names_a_clearly_better_model_and_a_difference_beyond_noise():
    y = _labels()
    table, diffs = _compared({"weak": _scores(y, 0.1, 1), "strong": _scores(y, 0.7, 2)}, y)
    text = readings.ranking(table, diffs)
    assert text.startswith("strong ranks first")
    assert "- weak: -" in text and "beyond noise" in text and "within noise" not in text


def test_ranking_calls_two_equal_models_within_noise():
    y = _labels()
    p = _scores(y, 0.4, 3)
    q = np.clip(p + np.random.default_rng(4).normal(0, 1e-3, p.shape), 0, 1)
    table, diffs = _compared({"a": p, "b": q}, y)
    text = readings.ranking(table, diffs)
    assert "within noise" in text and "beyond noise" not in text


def test_ranking_says_when_another_model_ranks_first_by_map():
    study = pd.DataFrame(
        {"course F1": [0.5, 0.45], "course F1 lo": [0.4, 0.35], "course F1 hi": [0.6, 0.55],
         "mAP": [0.55, 0.60]}, index=["net", "ensemble"])  # fmt: skip
    diffs = pd.DataFrame({"course F1": [-0.05], "course F1 lo": [-0.1], "course F1 hi": [0.0]},
                         index=["ensemble - net"])  # fmt: skip
    text = readings.ranking(study, diffs)
    assert (
        text.startswith("net ranks first") and "By mAP (no threshold) ensemble ranks first" in text
    )


def test_a_run_with_one_network_reads_without_pairs_or_fine_tuning():
    assert readings.wins({}) == "One network: nothing to pair."
    assert readings.finetuning(pd.DataFrame(), {"net": "frozen"}) == (
        "net: not in the table, no fine-tuned epoch beat its frozen head's validation mAP: "
        "the frozen head is its model."
    )
    assert readings.seeds(pd.DataFrame()).startswith("No frozen heads")
    one = pd.DataFrame({"course F1": [0.4], "train (min)": [3.0]}, index=["net"])
    assert "ranks 1 of 1" in readings.cost(one)


def test_no_error_to_show_is_said():
    y = _labels(50)
    assert readings.errors([], y, y.astype(float)).startswith("No error to show")
    assert analysis.confident_errors(y, y.astype(float), np.full(y.shape[1], 0.5)) == []


def test_errors_name_every_true_label_of_the_image_once_misread():
    """The collage labelled person, fork, bowl, orange, carrot and cake was read as "person,
    fork, bowl": three labels of six, and so as a labelling error."""
    y = np.zeros((2, 80), dtype=np.uint8)
    six = [CLASSES.index(c) for c in ("person", "fork", "bowl", "orange", "carrot", "cake")]
    y[0, six] = 1
    y[1, 0] = 1
    p = np.zeros((2, 80), dtype=np.float32)
    p[0, CLASSES.index("pizza")] = 0.9
    text = readings.errors([(0, CLASSES.index("pizza"), "FP")], y, p)
    assert "pizza predicted but not labelled (p = 0.90)" in text
    assert all(CLASSES[c] in text for c in six)
    caption = analysis.caption(y[0], CLASSES.index("pizza"), "FP", 0.9)
    assert all(CLASSES[c] in caption for c in six)


def test_label_counts_say_over_and_under_prediction_once_misread():
    """ "Above the diagonal predicts too many" was said of a plot whose axes said the reverse."""
    y = np.zeros((4, 80), dtype=np.uint8)
    y[:, 0] = 1  # one true label each
    over = y.copy()
    over[:, 1:4] = 1  # four predicted
    text = readings.label_counts(y, over)
    assert "4 of 4 images get more labels than they have (above the diagonal), 0 fewer" in text
    under = np.zeros_like(y)
    assert "0 of 4 images get more labels than they have (above the diagonal), 4 fewer" in (
        readings.label_counts(y, under)
    )
    # the figure: true labels across, predicted labels up, so over-prediction sits above
    import matplotlib

    matplotlib.use("Agg")
    fig = plots.plot_label_counts(analysis.label_count_table(y, over))
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("true") and ax.get_ylabel().startswith("predicted")
    image = ax.get_images()[0].get_array()
    assert image[4, 1] == 4 and image[1, 4] == 0  # row: predicted 4, column: true 1


def test_images_with_one_or_two_labels_are_counted_once_misread():
    """ "Photos with one or two labels lie mostly right of the diagonal": 32 of 64 did."""
    y = np.zeros((64, 80), dtype=np.uint8)
    y[:, 0] = 1
    pred = y.copy()
    pred[:32, 1] = 1  # half get one more label
    text = readings.label_counts(y, pred)
    assert "Of the 64 images with one or two true labels, 32 get more, 0 fewer." in text


def test_worst_classes_show_their_own_positives_once_misread():
    """The worst classes were read as "each seen once"; the table's showed 4, 2 and 2."""
    report = pd.DataFrame({"class": ["bench", "donut", "scissors", "person"],
                           "support": [4, 2, 2, 60], "f1": [0.0, 0.0, 0.0, 0.9]},
                          index=[13, 54, 76, 0])  # fmt: skip
    best, worst = analysis.best_and_worst(report, 3)
    text = readings.per_class(worst, best)
    assert "bench (4), donut (2), scissors (2)" in text
    assert "3 of these 3 have F1 0; 3 have fewer than 5 positives" in text
    assert "1 of the 3 best have 5 or more" in text


def test_every_well_supported_win_is_named_once_misread():
    """ "The one exception is cup": dog and laptop were exceptions too."""
    table = pd.DataFrame({"class": ["cup", "carrot", "dog", "laptop"], "positives": [17, 2, 12, 9],
                          "AP a": [0.6, 1.0, 0.5, 0.7], "AP b": [0.4, 0.2, 0.3, 0.4]})  # fmt: skip
    table["a - b"] = table["AP a"] - table["AP b"]
    text = readings.wins({"a vs b": table})
    assert text.startswith("1 of the 4 largest per-class differences")
    assert all(name in text for name in ("cup (17", "dog (12", "laptop (9"))
    assert "carrot (" not in text


def test_the_choice_of_view_and_model_is_read_from_the_table_once_misread():
    """Flip TTA was said to be "chosen on the evidence" where this run's table showed it costing
    the best network; without TTA another network was the best single one."""
    table = pd.DataFrame({"plain": [0.4908, 0.4770], "flip TTA": [0.4695, 0.4847]},
                         index=["lite0", "lite1"])  # fmt: skip
    table["kept"] = table[["plain", "flip TTA"]].idxmax(axis=1)
    best = table.apply(lambda r: r[r["kept"]], axis=1).idxmax()
    text = readings.choice(table, best)
    assert best == "lite0"
    assert "lite0: flip TTA -0.021 held-out course F1, not kept." in text
    assert "lite1: flip TTA +0.008 held-out course F1, kept." in text
    assert "The submission: lite0 (plain), held-out course F1 0.491" in text
    assert "Next: lite1, -0.006" in text


def test_a_class_with_one_positive_is_named_among_the_heaviest_weights():
    y = np.zeros((20, 80), dtype=np.uint8)
    y[:, 0] = 1
    y[0, CLASSES.index("toaster")] = 1
    y[:10, CLASSES.index("dog")] = 1
    text = readings.weights(analysis.class_weights(y))
    assert "The fewest validation positives, 1: toaster, 87.0% of the score each." in text
    assert text.endswith("person, with 20, weighs 4.35%.")


def test_data_names_the_rarest_classes_and_those_validation_cannot_see():
    Y = np.zeros((10, 80), dtype=np.uint8)
    Y[:, 0] = 1
    Y[0, 5] = 1  # bus, once, in training only
    y_val = Y[5:]
    text = readings.data(Y, y_val)
    assert "bus 1 (0)" in text and "1 classes have no validation image" in text


def test_steps_name_the_largest_and_those_beyond_noise():
    steps = pd.DataFrame(
        {"held-out course F1": [0.3, 0.45, 0.46], "gain": [np.nan, 0.15, 0.01],
         "gain lo": [np.nan, 0.1, -0.02], "gain hi": [np.nan, 0.2, 0.04]},
        index=["course rule", "one threshold", "+ top-1"])  # fmt: skip
    text = readings.steps(steps)
    assert "Largest step: one threshold, +0.150" in text
    assert "Steps beyond noise: one threshold." in text


def test_finetuning_and_seeds_read_their_intervals():
    phases = pd.DataFrame({"gain": [0.02], "gain lo": [-0.01], "gain hi": [0.05],
                           "mAP gain": [0.02], "mAP gain lo": [0.01], "mAP gain hi": [0.03]},
                          index=["lite1"])  # fmt: skip
    text = readings.finetuning(phases, {"lite0": "frozen", "lite1": "finetune (EMA)"})
    assert text.startswith("Fine-tuned minus frozen:\n- lite1: ")
    assert text.endswith("lite0: not in the table, no fine-tuned epoch beat its frozen head's "
                         "validation mAP: the frozen head is its model.")  # fmt: skip
    assert "lite1: not in the table" not in text
    assert "course F1 +0.020 [-0.010, +0.050], within noise" in text
    assert "mAP +0.020 [+0.010, +0.030], beyond noise" in text
    seeds = pd.DataFrame({"mean": [0.48, 0.47], "sd over seeds": [0.015, 0.013],
                          "bootstrap half-width (first seed)": [0.07, 0.08]},
                         index=["a", "b"])  # fmt: skip
    text = readings.seeds(seeds)
    assert "is larger" in text and "a and b are closer than one seed's sd" in text


def test_curves_say_when_map_peaks_after_the_lowest_validation_loss():
    epochs = ((1, 0.3, 0.2), (2, 0.4, 0.15), (3, 0.5, 0.18))  # epoch, val mAP, val loss
    rows = [{"phase": "frozen_mlp", "epoch": e, "val_mAP": m, "val_loss": loss,
             "train_loss": 0.1 / e, "seconds": 1.0} for e, m, loss in epochs]  # fmt: skip
    history = {"net": rows}
    summary = analysis.phase_summary(history)
    text = readings.curves(summary)
    assert "validation loss lowest at epoch 2, validation mAP best at epoch 3 (later)" in text


def test_the_test_score_is_placed_against_its_range():
    expect = {"expected": 0.5, "p10": 0.44, "p90": 0.6}
    assert "below the 10-90% range" in readings.test_score({"course_f1": 0.42, "n_images": 32},
                                                          expect)  # fmt: skip
    assert "inside" in readings.test_score({"course_f1": 0.5, "n_images": 32}, expect)
    assert readings.test_score(None, expect).startswith("No answers")


def test_confusions_and_cooccurrence_readings():
    table = pd.DataFrame({"predicted (absent)": ["bowl", "truck"],
                          "present": ["dining table", "car"], "images": [9, 2],
                          "share of its false positives": [0.6, 0.5],
                          "look-alike group": ["", "vehicles"]})  # fmt: skip
    text = readings.confusions(table)
    assert "bowl predicted beside dining table (9 images, 60%" in text
    assert "1 of the 2 pairs are look-alikes (vehicles)" in text
    assert "follow them more closely" in readings.cooccurrence(0.78, 0.68, "training labels")
    assert "follow them less closely" in readings.cooccurrence(0.5, 0.68, "training labels")


def test_the_committed_evidence_is_read_with_its_interval_and_photos():
    """Each row of tools/evidence's table: its difference, its interval, the verdict the
    interval gives (beyond noise only where it excludes 0) and what it was measured on."""
    table = pd.read_csv(analysis.EVIDENCE)
    lines = readings.evidence(table).splitlines()
    assert len(lines) == len(table)
    for line, (_, r) in zip(lines, table.iterrows()):
        lo, hi = r["course F1 difference lo"], r["course F1 difference hi"]
        assert f"[{lo:+.3f}, {hi:+.3f}]" in line and f"({r['photos']} photos" in line
        assert line.endswith(f"{r['protocol']})")
        assert ("beyond noise" in line) == (lo > 0 or hi < 0)
    beyond = table.iloc[[0]].assign(**{"course F1 difference lo": 0.002})
    assert "beyond noise" in readings.evidence(beyond)
