"""The analysis tables and figures: their numbers against the library's metric, synthetic arrays."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cocochallenge import analysis, checkpoints, files, metrics, plots, report, runs  # noqa: E402
from cocochallenge.config import NUM_CLASSES as C  # noqa: E402


def _scores(n=300, seed=0, rate=0.06):
    """Targets with every class present (rare and frequent ones) and informative probabilities."""
    rng = np.random.default_rng(seed)
    rates = np.geomspace(0.5, 0.01, C)
    y = (rng.random((n, C)) < rates).astype(np.uint8)
    y[np.arange(C) % n, np.arange(C)] = 1
    logits = rng.normal(-2.5, 1.0, (n, C)) + 2.5 * y
    return y, (1 / (1 + np.exp(-logits))).astype(np.float32)


@pytest.fixture()
def run_dir(tmp_path):
    """A run folder in the challenge notebook's layout: two models, their thresholds, the course's
    recipe on each, a frozen head with a second seed."""
    y, p = _scores(120, seed=1)
    rng = np.random.default_rng(2)
    stems = np.array([f"{i:012d}" for i in range(len(y))])
    names = ["m_a", "m_b"]
    for k, name in enumerate(names):
        out = tmp_path / "models" / name
        out.mkdir(parents=True)
        q = np.clip(p + rng.normal(0, 0.05 * (k + 1), p.shape), 1e-4, 1 - 1e-4).astype(np.float32)
        q_tta = np.clip(q + rng.normal(0, 0.02, p.shape), 1e-4, 1 - 1e-4).astype(np.float32)
        files.save_npz(out / "val_scores.npz", probs=q, probs_tta=q_tta, targets=y, stems=stems)
        files.save_npz(
            out / "test_scores.npz", probs=q[:10], probs_tta=q_tta[:10], stems=stems[:10]
        )
        files.save_json(
            {
                "train_seconds": 60.0 * (k + 1),
                "parameters": 1_000_000 * (k + 2),
                "val_images_per_second": 100.0 / (k + 1),
                "best_phase": "finetune",
            },
            out / "result.json",
        )
        # the best frozen head's validation scores, as the epoch loop keeps them: worse
        frozen = np.clip(q + rng.normal(0, 0.3, p.shape), 1e-4, 1 - 1e-4).astype(np.float32)
        checkpoints.PhaseCheckpoint(out, "frozen", {"model": torch.nn.Linear(2, 2)}).save(
            0, {}, 0.5, val_probs=frozen
        )
        files.save_json(
            [
                {
                    "phase": ph,
                    "epoch": e,
                    "global_epoch": g,
                    "seconds": 2.0,
                    "train_loss": 1 / g,
                    "val_loss": 1.1 / g,
                    "val_f1": 0.1 * g,
                    "val_mAP": 0.1 * g,
                }
                for g, (ph, e) in enumerate([("frozen", 1), ("frozen", 2), ("finetune", 1)], 1)
            ],
            out / "history.json",
        )
    files.save_json(
        {"backbones": names, "tta": True, "at_least_one": True, "shrink": 10, "data_root": ""},
        tmp_path / "config.json",
    )
    course = {"probs": np.full_like(p, 0.1), "f1": 0.0, "precision": 0.0, "recall": 0.0}
    for name in names:
        runs.save_baseline(tmp_path, name, course, y, epochs=5, best_epoch=3)
    # the first network's frozen head with another seed, as challenge.ipynb keeps it
    other = np.clip(p + rng.normal(0, 0.3, p.shape), 1e-4, 1 - 1e-4).astype(np.float32)
    seed1 = tmp_path / "models" / "m_a" / "seed1"
    state = {"model": torch.nn.Linear(2, 2)}
    checkpoints.PhaseCheckpoint(seed1, "frozen", state).save(0, {}, 0.5, val_probs=other)
    files.save_json(
        {"chosen": "ensemble", "data_root": str(tmp_path / "nowhere"), "demo": True},
        tmp_path / "summary.json",
    )
    files.save_json(
        {"seed": 0, "val_fraction": 0.1, "train": ["000000999999"], "val": stems.tolist()},
        tmp_path / "split.json",
    )
    probs = {n: files_probs(tmp_path, n) for n in names}
    probs["ensemble"] = np.mean(list(probs.values()), axis=0)
    thresholds = {}  # the notebook's rule (section 9)
    for m, q in probs.items():
        best, _ = metrics.best_global_threshold(y, q)
        t = metrics.shrunk_thresholds(y, q, 10, best)
        thresholds[m] = {"global": best, "per_class": t.tolist(), "tta": True, "shrink": 10}
    files.save_json(thresholds, tmp_path / "thresholds.json")
    return tmp_path


def files_probs(run_dir, name):
    return runs.load_scores(run_dir, name)["probs_tta"]


def test_threshold_sweep_matches_library_metrics():
    y, p = _scores()
    y[:, 7] = 0  # a class without positives: not averaged
    grid = np.array([0.05, 0.2, 0.5, 0.8])
    sw = analysis.threshold_sweep(y, p, grid)
    assert len(sw) == len(grid)
    for t, row in zip(grid, sw.itertuples()):
        ref = metrics.evaluate_predictions(y, p, t)
        assert row.course_f1 == pytest.approx(ref["course_f1"], abs=1e-12)
        assert row.macro_f1 == pytest.approx(ref["macro_f1"], abs=1e-12)
        assert row.labels_per_image == pytest.approx(ref["labels_per_image"])


def test_per_class_table_adds_up_to_the_course_metric():
    y, p = _scores(seed=3)
    thr = np.maximum(metrics.per_class_thresholds(y, p), 0.8)  # high: many images get no class ...
    assert (
        metrics.apply_thresholds(p, thr).sum(1) == 0
    ).sum() > 10  # ... so the top-1 guarantee matters
    rep = metrics.per_class_table(y, p, thr, at_least_one=True, train_counts=y.sum(0) * 9)
    assert len(rep) == C and list(rep["train images"]) == list(y.sum(0) * 9)
    w = 1.0 / rep["support"].to_numpy()
    w /= w.sum()
    ref = metrics.evaluate_predictions(y, p, thr, at_least_one=True)
    assert (rep["precision"] * w).sum() == pytest.approx(ref["precision"], abs=1e-12)
    assert (rep["recall"] * w).sum() == pytest.approx(ref["recall"], abs=1e-12)
    assert rep["predicted"].sum() == metrics.apply_thresholds(p, thr, True).sum()
    # without the top-1 guarantee fewer predictions are made
    plain = metrics.per_class_table(y, p, thr)
    assert plain["predicted"].sum() < rep["predicted"].sum() and "train images" not in plain


def test_best_and_worst_rank_only_classes_with_positives():
    rep = pd.DataFrame(
        {"class": list("abcde"), "support": [0, 5, 1, 9, 3], "f1": [0.0, 0.0, 0.9, 0.0, 0.5]}
    )
    best, worst = analysis.best_and_worst(rep, 2)
    assert list(best["class"]) == ["c", "e"]
    assert list(worst["class"]) == ["d", "b"]  # equal F1: better-supported first
    assert "a" not in set(best["class"]) | set(worst["class"])


def test_error_examples_are_the_most_confident_mistakes():
    y = np.array([[1], [0], [0], [1], [1], [0]])
    probs = np.array([[0.9], [0.8], [0.6], [0.1], [0.3], [0.2]])
    pred = probs > 0.5
    fp, fn = analysis.error_examples(y, pred, probs, 0, n=5)
    assert fp.tolist() == [1, 2]  # highest probability first
    assert fn.tolist() == [3, 4]  # lowest probability first
    fp1, _ = analysis.error_examples(y, pred, probs, 0, n=1)
    assert fp1.tolist() == [1]
    row = np.zeros(C, dtype=bool)
    row[[1, 2, 3, 4, 5, 60]] = True  # the grid's captions: the row's class first
    assert plots._names(row, first=60).startswith("dining table, bicycle")
    scores = np.zeros(C)
    scores[5] = 0.9
    assert plots._names(row, first=60, scores=scores).startswith("dining table, bus, bicycle")
    assert plots._names(row).endswith("+2") and plots._names(np.zeros(C)) == "(none)"
    assert plots._names(row, width=12) == "bicycle, car +4"  # captions stay short


def test_cooccurrence_is_conditional_and_similarity_is_a_correlation():
    Y = np.zeros((4, C), dtype=np.uint8)
    Y[:, 0] = 1  # class 0 in all four images
    Y[:2, 1] = 1  # class 1 in two of them
    P = analysis.cooccurrence(Y)
    assert P[0, 1] == pytest.approx(0.5) and P[1, 0] == pytest.approx(1.0)
    assert np.isnan(P[0, 0]) and np.isnan(P[5]).all()  # diagonal and absent classes
    a = np.random.default_rng(0).random((C, C))
    assert analysis.cooccurrence_similarity(a, a) == pytest.approx(1.0)
    assert analysis.cooccurrence_similarity(a, 1 - a) == pytest.approx(-1.0)
    assert np.isnan(analysis.cooccurrence_similarity(P, P * np.nan))


def test_label_count_table_counts_and_caps():
    y = np.zeros((3, C), dtype=np.uint8)
    pred = np.zeros((3, C), dtype=bool)
    y[0, :2] = 1
    pred[0, :2] = True
    y[1, :1] = 1
    pred[1, :15] = True  # 15 predicted: pooled as 10
    t = analysis.label_count_table(y, pred, cap=10)
    assert t.to_numpy().sum() == 3
    assert t.loc[2, 2] == 1 and t.loc[1, 10] == 1 and t.loc[0, 0] == 1
    assert t.shape == (11, 11)


def test_threshold_steps_are_held_out_with_paired_gains_and_skip_what_is_missing():
    from cocochallenge import compare

    y, p = _scores(seed=4)
    p[:60] *= 0.1  # images whose every score is low: the top-1 guarantee gives them a class
    p_tta = np.clip(p + 0.01, 0, 1)
    steps = analysis.threshold_steps(y, p, p_tta, None, shrink=10, n_boot=200)
    assert steps.loc["+ top-1 guarantee", "labels/image"] > steps.iloc[3]["labels/image"]
    assert len(steps) == 6 and "+ ensemble" not in steps.index
    f1 = steps["held-out course F1"]
    # the fixed rules tune nothing; the tuned steps are the notebooks' held-out course F1
    assert f1.iloc[0] == pytest.approx(
        metrics.course_f1(y, p > metrics.COURSE_LOGIT_THRESHOLD_AS_PROB)["f1"]
    )
    assert f1.iloc[1] == pytest.approx(metrics.course_f1(y, p > 0.5)["f1"])
    assert f1["+ top-1 guarantee"] == pytest.approx(compare.held_out_course_f1(y, p, 10, True))
    assert f1["+ flip TTA"] == pytest.approx(compare.held_out_course_f1(y, p_tta, 10, True))
    np.testing.assert_allclose(steps["gain"].iloc[1:], np.diff(f1))
    assert (
        ((steps["gain lo"] <= steps["gain"]) & (steps["gain"] <= steps["gain hi"])).iloc[1:].all()
    )
    assert steps.loc["one threshold for every class", "gain hi"] > 0
    with_ens = analysis.threshold_steps(y, p, p_tta, (p + p_tta) / 2, shrink=10, n_boot=50)
    assert with_ens.index[-1] == "+ ensemble" and len(with_ens) == 7
    no_tta = analysis.threshold_steps(y, p, None, None, shrink=10, n_boot=50)  # no TTA run
    assert list(no_tta.index) == list(steps.index[:5])


def test_run_artifacts_read_what_the_notebook_saved(run_dir):
    run = analysis.RunArtifacts(run_dir)
    assert run.models == ["m_a", "m_b", "ensemble"] and run.chosen() == "ensemble"
    np.testing.assert_allclose(
        run.probs["ensemble"], (run.val["m_a"]["probs_tta"] + run.val["m_b"]["probs_tta"]) / 2
    )
    assert run.train_labels() is None  # no data folder: figures skip it
    assert set(run.baselines) == {"m_a", "m_b"} and run.baselines["m_a"]["best_epoch"] == 3
    assert list(run.seed_probs["m_a"]) == [0, 1] and list(run.seed_probs["m_b"]) == [0]
    phases = analysis.phase_summary(run.history)
    row = phases.loc[("m_a", "frozen")]
    assert row["epochs"] == 2 and row["at epoch"] == 2 and row["lowest val loss at epoch"] == 2
    assert phases.loc[("m_a", "finetune"), "epochs"] == 1
    assert "best EMA mAP" not in phases  # no moving average in these histories
    with_ema = {
        "m": [
            {"phase": "frozen", "epoch": 1, "val_mAP": 0.3, "val_loss": 0.2},
            {"phase": "finetune", "epoch": 1, "val_mAP": 0.4, "ema_mAP": 0.45, "val_loss": 0.1},
            {"phase": "finetune", "epoch": 2, "val_mAP": 0.42, "ema_mAP": 0.44, "val_loss": 0.3},
        ]
    }
    summary = analysis.phase_summary(with_ema).loc[("m", "finetune")]
    assert summary["best EMA mAP"] == 0.45 and summary["lowest val loss at epoch"] == 1
    assert analysis.phase_summary({"m": [{"phase": "frozen", "val_mAP": 0.3}]}).empty
    with pytest.raises(ValueError, match="not a model"):
        run.chosen("nope")


def test_run_artifacts_names_the_missing_step(tmp_path, run_dir):
    with pytest.raises(FileNotFoundError, match="challenge.ipynb") as err:
        analysis.RunArtifacts(tmp_path / "empty")
    # in a notebook the message is shown alone, without a traceback
    assert err.value._render_traceback_() == [f"RunNotFound: {err.value}"]
    (run_dir / "models" / "m_b" / "val_scores.npz").unlink()
    with pytest.raises(FileNotFoundError, match="m_b"):
        analysis.RunArtifacts(run_dir)


def test_every_figure_draws_and_saves(run_dir):
    run = analysis.RunArtifacts(run_dir)
    study, _ = analysis.study(run, n_boot=50)
    reports = {
        m: metrics.per_class_table(run.targets, run.probs[m], run.thresholds[m], True)
        for m in run.models
    }
    pred = run.predictions("m_a")
    sweeps = {m: analysis.threshold_sweep(run.targets, run.probs[m]) for m in run.models}
    steps = analysis.threshold_steps(
        run.targets,
        run.val["m_a"]["probs"],
        run.val["m_a"]["probs_tta"],
        run.probs["ensemble"],
        n_boot=50,
    )
    figs = {
        "weights": plots.plot_class_weights(analysis.class_weights(run.targets)),
        "cost": plots.plot_cost_accuracy(study.loc[run.models]),
        "freq": plots.plot_f1_vs_frequency(reports, run.targets.sum(0)),
        "sweep": plots.plot_threshold_sweep(sweeps, run.global_thresholds),
        "dist": plots.plot_threshold_distribution(
            run.thresholds, run.targets.sum(0), run.global_thresholds
        ),
        "steps": plots.plot_threshold_steps(steps),
        "errors": plots.plot_error_grid(
            [run.image_path(s) for s in run.stems], run.targets, pred, run.probs["m_a"], [0, 1], 2
        ),
        "cooc": plots.plot_cooccurrence(
            {"truth": analysis.cooccurrence(run.targets), "pred": analysis.cooccurrence(pred)}
        ),
        "counts": plots.plot_label_counts(analysis.label_count_table(run.targets, pred)),
        "history": plots.plot_history(run_dir, run.names),
    }
    for name, fig in figs.items():
        path = plots.save_figure(fig, run_dir, name)
        assert path == run_dir / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        plt.close(fig)
    assert not (run_dir / "training_curves.png").exists()  # drawing writes nothing


def test_points_lost_add_up_to_the_course_metric():
    rng = np.random.default_rng(4)
    y = (rng.random((120, 80)) < 0.08).astype(np.uint8)
    p = np.clip(y * 0.4 + rng.random((120, 80)) * 0.6, 0, 1)
    rep = metrics.per_class_table(y, p, 0.5)
    lost = analysis.points_lost(rep)
    ref = metrics.course_f1(y, p > 0.5)
    assert lost["lost precision"].sum() == pytest.approx(1 - ref["precision"], abs=1e-9)
    assert lost["lost recall"].sum() == pytest.approx(1 - ref["recall"], abs=1e-9)
    assert lost["lost total"].is_monotonic_decreasing and (lost["support"] > 0).all()


def test_the_study_scores_every_model_with_intervals_and_the_course_recipe(run_dir):
    """The comparison of section 3: every network, the ensemble and the course's recipe on each
    network's features, on the same images; the seeds; fine-tuning against the frozen heads."""
    from cocochallenge import compare

    run = analysis.RunArtifacts(run_dir)
    study, diffs = analysis.study(run, n_boot=200)
    recipes = ["course recipe on m_a", "course recipe on m_b"]
    assert list(study.index) == ["m_a", "m_b", "ensemble", *recipes]
    assert np.isnan(study.loc[recipes[0], "train (min)"])
    for key in ("course F1", "macro F1", "mAP"):
        assert (study[f"{key} lo"] <= study[key]).all() and (study[key] <= study[f"{key} hi"]).all()
    # the point estimate is the notebooks' held-out course F1: one number per quantity
    held = compare.held_out_course_f1(run.targets, run.probs["m_a"], run.shrink, True)
    assert study.loc["m_a", "course F1"] == pytest.approx(held)
    best = study["course F1"].idxmax()
    assert all(name.endswith(f" - {best}") for name in diffs.index) and len(diffs) == 4
    assert diffs.loc[f"{recipes[0]} - {best}", "course F1 beyond noise"]  # it predicts nothing
    phases = analysis.frozen_against_finetuned(run, n_boot=200)
    assert list(phases.index) == ["m_a", "m_b"] and (phases["gain"] > 0).all()
    seeds = analysis.seed_table(run, n_boot=200)
    assert list(seeds.index) == ["m_a"]  # m_b has one seed: no spread to show
    f1 = [seeds.loc["m_a", "seed 0"], seeds.loc["m_a", "seed 1"]]
    assert seeds.loc["m_a", "sd over seeds"] == pytest.approx(np.std(f1, ddof=1))
    assert seeds.loc["m_a", "seed 0"] == pytest.approx(
        compare.held_out_course_f1(run.targets, run.frozen_probs["m_a"], run.shrink, True)
    )
    assert seeds.loc["m_a", "bootstrap half-width (first seed)"] > 0


def test_class_weights_confusions_and_the_test_against_its_range():
    Y = np.zeros((10, C), dtype=np.uint8)
    Y[:, 0], Y[:2, 2], Y[:1, 7] = 1, 1, 1  # person everywhere, car twice, truck once
    w = analysis.class_weights(Y)
    assert list(w["class"]) == ["truck", "car", "person"] and w["cumulative"].iloc[-1] == 1
    assert w["weight"].tolist() == pytest.approx([1 / 1.6, 0.5 / 1.6, 0.1 / 1.6])
    pred = Y.astype(bool).copy()
    pred[1:4, 7] = True  # truck predicted on images 1..3: two have a car, all have a person
    every = analysis.confusions(Y, pred, analysis.cooccurrence(Y), exclude=())
    first = every.iloc[0]
    assert list(first[["predicted (absent)", "present", "images"]]) == ["truck", "person", 3]
    table = analysis.confusions(Y, pred, analysis.cooccurrence(Y))  # person, everywhere: left out
    assert len(table) == 1 and table.iloc[0]["present"] == "car"
    car = table.iloc[0]
    assert car["images"] == 1 and car["share of its false positives"] == pytest.approx(1 / 3)
    assert car["P(predicted | present), training"] == pytest.approx(0.5)
    assert car["look-alike group"] == "vehicles" and first["look-alike group"] == ""
    summary = {"test_scores": {"course_f1": 0.42, "n_images": 32},
               "expected_course_f1": {"expected": 0.5, "p10": 0.44, "p90": 0.6}}  # fmt: skip
    assert analysis.test_against_expected(summary)["where"].item() == "below"
    assert analysis.test_against_expected({}) is None


def test_reading_prose_must_quote_numbers_its_outputs_hold():
    """The team's readings (cells tagged team-reading) are checked against the outputs, of their
    own section or of the one a (§N) names; untagged prose (what is measured, how to read it)
    and quoted lines are not."""

    def cell(kind, text, out="", tags=()):
        c = {"cell_type": kind, "source": [text], "metadata": {"tags": list(tags)}}
        if kind == "code":
            c["outputs"] = [{"output_type": "stream", "name": "stdout", "text": out}]
        return c

    nb = {"cells": [
        cell("markdown", "## 2. The study"), cell("code", "x", "f1 0.491 [0.415, 0.567]"),
        cell("markdown", "We read 0.491, between 0.415 and 0.567.\n> quoted: 13.6%",
             tags=["team-reading"]),
        cell("markdown", "How to read it: 0.05 is a typical width."),
        cell("markdown", "## 3. Other"), cell("code", "y", "0.25"),
        cell("markdown", "## 4. Conclusions"),
        cell("markdown", "Lite1 0.491 (§2) and 0.25 (§3).\n\nAnd 0.25 again (§2).",
             tags=["team-reading"]),
    ]}  # fmt: skip
    assert report.unbacked_numbers(nb) == ["0.25 (section 2): not in its outputs"]
    nb["cells"][2]["source"] = ["We read 0.49, not 0.491."]  # a prefix is not a match
    assert report.unbacked_numbers(nb) == [
        "0.49 (section 2): not in its outputs", "0.25 (section 2): not in its outputs"
    ]  # fmt: skip
    nb["cells"][7]["metadata"]["tags"] = []  # untagged: not the team's reading, not checked
    assert report.unbacked_numbers(nb) == ["0.49 (section 2): not in its outputs"]
