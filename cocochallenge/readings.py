"""Readings: the sentences under each table and figure, computed from the run's own numbers.

Prose written for one run is false on the next. So what depends on a run (what ranks first
and by how much, whether a difference is beyond noise, which classes, which way a plot leans,
what was decided) is said here, by code, from the numbers the table or figure shows; the
markdown around says only what is measured and how to read it. Each function takes what its
cell has just shown and returns its reading: ``print(readings.ranking(study, differences))``.

Conventions: numbers to 3 decimals at most; an interval is the 90% paired-bootstrap interval
over the validation images (:mod:`compare`), written ``[lo, hi]``; a difference is "beyond
noise" when its interval leaves out zero.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .config import CLASSES

#: Classes with fewer validation positives than this are "rare" in a reading: their F1 or AP
#: is one or two photos right or wrong.
FEW = 5


def _n(x: float) -> str:
    return f"{x:.3f}"


def _gain(x: float, lo: float, hi: float) -> str:
    """A difference with its interval and verdict: ``+0.012 [-0.010, +0.034], within noise``."""
    verdict = "beyond noise" if lo > 0 or hi < 0 else "within noise"
    return f"{x:+.3f} [{lo:+.3f}, {hi:+.3f}], {verdict}"


def _span(values) -> str:
    """``0.300`` or ``0.300 to 0.350``."""
    lo, hi = float(np.min(values)), float(np.max(values))
    return _n(lo) if np.isclose(lo, hi) else f"{_n(lo)} to {_n(hi)}"


def _names(items, limit: int = 6) -> str:
    items = list(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(str(i) for i in items[:limit]) + more


def _epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


# ---- challenge.ipynb ---------------------------------------------------------------------------
def data(Y: np.ndarray, y_val: np.ndarray, n: int = 5) -> str:
    """The labelled set: labels per image, the rarest classes and their validation images."""
    Y, y_val = np.asarray(Y), np.asarray(y_val)
    count, val = Y.sum(0), y_val.sum(0)
    present = np.flatnonzero(count > 0)
    rare = present[np.argsort(count[present], kind="stable")][:n]
    lines = [
        f"{len(Y)} labelled images, {Y.sum(1).mean():.2f} labels per image (at most "
        f"{int(Y.sum(1).max())}); {len(present)} of {Y.shape[1]} classes present.",
        "The rarest classes, images in all (in validation): "
        + _names(f"{CLASSES[c]} {count[c]} ({val[c]})" for c in rare)
        + ".",
    ]
    unseen = [CLASSES[c] for c in present if val[c] == 0]
    if unseen:
        lines.append(
            f"{len(unseen)} classes have no validation image, so no validation score sees "
            f"them: {_names(unseen)}."
        )
    return "\n".join(lines)


def training(results: dict, history: dict) -> str:
    """Per network: the epochs each phase ran, its best epoch, the head kept and against which
    other head, and the phase kept."""
    lines = []
    for name, result in results.items():
        parts = []
        for phase, label in (("frozen", "frozen"), ("finetune", "fine-tuning")):
            rows = [r for r in history.get(name, []) if str(r.get("phase", "")).startswith(phase)]
            if rows:
                best = max(rows, key=lambda r: r["val_mAP"])
                parts.append(
                    f"{label} {_epochs(len(rows))}, best validation mAP {_n(best['val_mAP'])} "
                    f"at epoch {best['epoch']}"
                )
        heads = result.get("heads") or {}
        kind = result.get("head")
        others = ", ".join(f"{k} {_n(v)}" for k, v in heads.items() if k != kind)
        head = f"{kind} head" + (f" (frozen mAP {_n(heads[kind])}; {others})" if others else "")
        kept = f"kept: {result.get('best_phase', '?')}" + (f", {head}" if kind else "")
        lines.append(f"{name}: {'; '.join(parts) or 'no epochs'}; {kept}.")
    return "\n".join(lines)


def seeds_and_recipe(seeds: pd.DataFrame, recipe: pd.DataFrame) -> str:
    """The kept frozen head's best validation mAP over seeds, and the course's recipe."""
    lines = []
    for name, row in seeds.iterrows():
        row = row.dropna()
        lines.append(
            f"{name}: over {len(row)} seeds the kept head's best validation mAP is "
            f"{_span(row)} (a spread of {_n(row.max() - row.min())})."
        )
    if len(recipe):
        lines.append(
            "The course's recipe on the same features: course F1 (raw output > 0.5) "
            f"{_span(recipe['course F1 (raw > 0.5)'])}, its best epoch "
            f"{int(recipe['best epoch'].min())} to {int(recipe['best epoch'].max())} of "
            f"{int(recipe['epochs'].max())}."
        )
    return "\n".join(lines)


def choice(table: pd.DataFrame, chosen: str) -> str:
    """What the held-out check decided: each model's view (plain or flip TTA), then the model.

    ``table``: a row per model with the held-out course F1 of each view (columns ``plain`` and
    ``flip TTA``) and ``kept``, the view with the higher one.
    """
    lines = []
    for model, row in table.iterrows():
        gain = row["flip TTA"] - row["plain"]
        verdict = "kept" if row["kept"] == "flip TTA" else "not kept"
        lines.append(f"{model}: flip TTA {gain:+.3f} held-out course F1, {verdict}.")
    score = table.apply(lambda r: r[r["kept"]], axis=1).sort_values(ascending=False)
    lines.append(
        f"The submission: {chosen} ({table.loc[chosen, 'kept']}), held-out course F1 "
        f"{_n(score[chosen])}, the highest of the table."
    )
    if len(score) > 1:
        runner = score.index[1]
        lines.append(
            f"Next: {runner}, {score[runner] - score[chosen]:+.3f}; analysis.ipynb gives each "
            "difference its interval."
        )
    return "\n".join(lines)


def expected(expect: dict, n_test: int, candidates: int) -> str:
    """The course F1 to expect on the test set, as a range."""
    return (
        f"On {n_test} test images: expected course F1 {_n(expect['expected'])}; 80% of test "
        f"sets of that size score {_n(expect['p10'])} to {_n(expect['p90'])}. The chosen model "
        f"is the best of {candidates} candidates on these validation images: the estimate "
        "flatters it a little."
    )


def test_score(scores: dict | None, expect: dict) -> str:
    """The test images' course F1 against the range predicted for them, when answers exist."""
    if not scores:
        return "No answers for these test images: the leaderboard will score the submission."
    f1, lo, hi = scores["course_f1"], expect["p10"], expect["p90"]
    where = "below" if f1 < lo else "above" if f1 > hi else "inside"
    return (
        f"The {scores['n_images']} test images score {_n(f1)} (course F1): {where} the 10-90% "
        f"range predicted for a test set of their size, {_n(lo)} to {_n(hi)}."
    )


# ---- analysis.ipynb ----------------------------------------------------------------------------
def weights(table: pd.DataFrame, n: int = 10) -> str:
    """What the metric's weights say: the heaviest classes' share, the rarest, the lightest."""
    top = table.head(n)
    fewest = table[table["positives"] == table["positives"].min()]
    light = table.iloc[-1]
    return (
        f"The {len(top)} heaviest of {len(table)} classes weigh {top['weight'].sum():.1%} of "
        f"the score. The fewest validation positives, {int(fewest['positives'].iloc[0])}: "
        f"{_names(fewest['class'])}, {fewest['weight'].iloc[0]:.1%} of the score each. "
        f"{light['class']}, with {int(light['positives'])}, weighs {light['weight']:.2%}."
    )


def ranking(study: pd.DataFrame, differences: pd.DataFrame) -> str:
    """Who ranks first by held-out course F1, by how much, and which differences are beyond
    noise; and the first by mAP when it is another model."""
    first = study["course F1"].idxmax()
    r = study.loc[first]
    lines = [
        f"{first} ranks first: held-out course F1 {_n(r['course F1'])} "
        f"[{_n(r['course F1 lo'])}, {_n(r['course F1 hi'])}]. The others, minus {first}:"
    ]
    for label, d in differences.sort_values("course F1", ascending=False).iterrows():
        model = label.rsplit(" - ", 1)[0]
        lines.append(f"- {model}: {_gain(d['course F1'], d['course F1 lo'], d['course F1 hi'])}")
    if "mAP" in study and study["mAP"].notna().any():
        top = study["mAP"].idxmax()
        if top != first:
            lines.append(
                f"By mAP (no threshold) {top} ranks first, {_n(study.loc[top, 'mAP'])} against "
                f"{_n(study.loc[first, 'mAP'])}."
            )
    return "\n".join(lines)


def cost(study: pd.DataFrame) -> str:
    """Whether the costliest model to train is also the best."""
    trained = study["train (min)"].dropna()
    if trained.empty:
        return "No training time recorded."
    slow, best = trained.idxmax(), study["course F1"].idxmax()
    rank = int(study["course F1"].rank(ascending=False, method="min")[slow])
    return (
        f"The costliest to train, {slow} ({trained[slow]:.1f} min), ranks {rank} of "
        f"{len(study)} by held-out course F1; the first is {best} ({trained.get(best, np.nan):.1f}"
        " min)."
    )


def seeds(table: pd.DataFrame) -> str:
    """Luck of the seed against luck of the images, for the frozen heads of the seed table."""
    if table.empty:
        return "No frozen heads of other seeds in this run folder."
    sd, half = table["sd over seeds"], table["bootstrap half-width (first seed)"]
    larger = "larger" if half.min() > sd.max() else "not always larger"
    order = table["mean"].sort_values(ascending=False)
    lines = [
        f"Frozen heads: the seed moves the held-out course F1 by an sd of {_span(sd)}; the "
        f"images' bootstrap half-width, {_span(half)}, is {larger}.",
        "Mean over seeds: " + ", ".join(f"{m} {_n(v)}" for m, v in order.items()) + ".",
    ]
    if len(order) > 1 and order.iloc[0] - order.iloc[1] < sd.max():
        lines.append(f"{order.index[0]} and {order.index[1]} are closer than one seed's sd.")
    return "\n".join(lines)


def finetuning(table: pd.DataFrame, kept: dict) -> str:
    """What fine-tuning bought each network over its kept frozen head; ``kept``: each network's
    kept phase (``result.json``'s ``best_phase``), which names the networks the table leaves out.
    """
    lines = ["Fine-tuned minus frozen:"] if len(table) else []
    for name, r in table.iterrows():
        f1 = _gain(r["gain"], r["gain lo"], r["gain hi"])
        ap = _gain(r["mAP gain"], r["mAP gain lo"], r["mAP gain hi"])
        lines.append(f"- {name}: course F1 {f1}; mAP {ap}")
    for name, phase in kept.items():
        if name not in table.index:
            why = "no frozen scores saved"
            if not phase.startswith("fine"):
                why = "no fine-tuned epoch beat its frozen head's validation mAP: "
                why += "the frozen head is its model"
            lines.append(f"{name}: not in the table, {why}.")
    return "\n".join(lines) or "No network: nothing to compare."


def wins(tables: dict, few: int = FEW) -> str:
    """How many of the largest per-class AP differences rest on classes with few positives;
    every exception by name."""
    if not tables:
        return "One network: nothing to pair."
    rows = pd.concat(tables.values())
    lines = [
        f"{int((rows['positives'] < few).sum())} of the {len(rows)} largest per-class "
        f"differences are on classes with fewer than {few} validation positives."
    ]
    many = [
        f"{r['class']} ({r['positives']} positives, AP {_n(r['AP a'])} against {_n(r['AP b'])},"
        f" {pair})"
        for pair, t in tables.items()
        for _, r in t.iterrows()
        if r["positives"] >= few
    ]
    if many:
        lines.append(f"With {few} or more: " + "; ".join(many) + ".")
    return "\n".join(lines)


def errors(errors: list, targets: np.ndarray, probs: np.ndarray) -> str:
    """Each confident error: the class predicted or missed, its probability, every true label."""
    if not errors:
        return "No error to show: the model gets every validation label right."
    lines = []
    for row, cls, kind in errors:
        labels = ", ".join(CLASSES[c] for c in np.flatnonzero(targets[row])) or "(none)"
        what = "predicted but not labelled" if kind == "FP" else "labelled but missed"
        lines.append(f"{CLASSES[cls]} {what} (p = {probs[row, cls]:.2f}); labels: {labels}.")
    return "\n".join(lines)


def curves(summary: pd.DataFrame) -> str:
    """Over-fitting in numbers: training against validation loss, and where each is best."""
    if summary.empty:
        return "No epochs to read: the heads were fitted in one go."
    lines = []
    for (name, phase), r in summary.iterrows():
        later = r["at epoch"] > r["lowest val loss at epoch"]
        lines.append(
            f"{name}, {phase}: {_epochs(int(r['epochs']))}; last loss "
            f"{_n(r['last train loss'])} on training images, {_n(r['last val loss'])} on "
            f"validation; validation loss lowest at epoch {int(r['lowest val loss at epoch'])}, "
            f"validation mAP best at epoch {int(r['at epoch'])}{' (later)' if later else ''}."
        )
    return "\n".join(lines)


def per_class(worst: pd.DataFrame, best: pd.DataFrame, few: int = FEW) -> str:
    """The worst and best classes, with their validation positives."""
    zero = int((worst["f1"] == 0).sum())
    rare = int((worst["support"] < few).sum())
    return "\n".join(
        [
            "Worst (validation positives): "
            + _names((f"{r['class']} ({r['support']})" for _, r in worst.iterrows()), 10)
            + ".",
            f"{zero} of these {len(worst)} have F1 0; {rare} have fewer than {few} positives.",
            f"{int((best['support'] >= few).sum())} of the {len(best)} best have {few} or more.",
        ]
    )


def points_lost(lost: pd.DataFrame, n: int = 10) -> str:
    """Where the score is lost: the costliest classes, by recall or by precision."""
    top = lost.head(n)
    share = top["lost total"].sum() / max(lost["lost total"].sum(), 1e-12)
    by_recall = int((top["lost recall"] > top["lost precision"]).sum())
    return (
        f"The {len(top)} costliest classes hold {share:.0%} of what is lost; {by_recall} of "
        f"them lose more by recall than by precision. Costliest: {_names(top['class'], 3)}."
    )


def frequency(rho: float, n: int) -> str:
    """Whether per-class F1 follows the class's frequency (Spearman's correlation)."""
    how = "hardly" if abs(rho) < 0.3 else "clearly" if abs(rho) >= 0.6 else "partly"
    return f"Spearman correlation of F1 and frequency over {n} classes: {rho:.2f} ({how})."


def sweep(table: pd.DataFrame) -> str:
    """The best single threshold and the labels per image it predicts, against 0.5."""
    best = table.loc[table["course_f1"].idxmax()]
    half = table.loc[(table["threshold"] - 0.5).abs().idxmin()]
    return (
        f"Best single threshold {best['threshold']:.2f} (in-sample course F1 "
        f"{_n(best['course_f1'])}, {best['labels_per_image']:.2f} predicted labels per "
        f"image); at 0.5: {_n(half['course_f1'])}, {half['labels_per_image']:.2f}."
    )


def thresholds(support, shrink: float) -> str:
    """How many classes lean on the global threshold (fewer positives than the shrinkage)."""
    support = np.asarray(support)
    few = int((support < shrink).sum())
    return (
        f"{few} of {len(support)} classes have fewer than {shrink:g} validation positives: "
        "their thresholds lean mostly on the global one."
    )


def steps(table: pd.DataFrame) -> str:
    """From the course's rule to the submission: the largest step, those beyond noise."""
    gains = table.dropna(subset=["gain"])
    beyond = gains[(gains["gain lo"] > 0) | (gains["gain hi"] < 0)]
    top = gains["gain"].idxmax()
    g = gains.loc[top]
    return "\n".join(
        [
            f"From {_n(table.iloc[0]['held-out course F1'])} ({table.index[0]}) to "
            f"{_n(table.iloc[-1]['held-out course F1'])} ({table.index[-1]}).",
            f"Largest step: {top}, {_gain(g['gain'], g['gain lo'], g['gain hi'])}.",
            f"Steps beyond noise: {_names(beyond.index) if len(beyond) else 'none'}.",
        ]
    )


def label_counts(targets: np.ndarray, pred: np.ndarray) -> str:
    """Predicted against true labels per image: how many images get more, fewer, as many."""
    targets, pred = np.asarray(targets).astype(bool), np.asarray(pred).astype(bool)
    t, p = targets.sum(1), pred.sum(1)
    more, fewer = int((p > t).sum()), int((p < t).sum())
    lines = [
        f"Predicted labels per validation image {p.mean():.2f}, true {t.mean():.2f}: {more} of "
        f"{len(t)} images get more labels than they have (above the diagonal), {fewer} fewer "
        f"(below), {len(t) - more - fewer} as many."
    ]
    small = t <= 2
    if small.any():
        lines.append(
            f"Of the {int(small.sum())} images with one or two true labels, "
            f"{int((p[small] > t[small]).sum())} get more, {int((p[small] < t[small]).sum())} "
            "fewer."
        )
    lines.append(f"Exactly the right label set: {(pred == targets).all(1).mean():.1%} of images.")
    return "\n".join(lines)


def confusions(table: pd.DataFrame) -> str:
    """The commonest false positives that come with another class: look-alikes or context."""
    if table.empty:
        return "No false positive comes with another class here."
    look = table[table["look-alike group"] != ""]
    top = table.iloc[0]
    groups = f" ({_names(look['look-alike group'].unique())})" if len(look) else ""
    return (
        f"Commonest: {top['predicted (absent)']} predicted beside {top['present']} "
        f"({top['images']} images, {top['share of its false positives']:.0%} of its false "
        f"positives). {len(look)} of the {len(table)} pairs are look-alikes{groups}, the others "
        "context."
    )


def cooccurrence(sim_pred: float, sim_true: float, source: str) -> str:
    """Whether the predictions follow the reference co-occurrences more than the truth does."""
    closer = "more" if sim_pred > sim_true else "less"
    return (
        f"Correlation with the {source}: predictions {sim_pred:.2f}, validation truth "
        f"{sim_true:.2f}: the predictions follow them {closer} closely than the truth does."
    )


def test_against(table: pd.DataFrame | None) -> str:
    """The test score against its predicted range (the analysis' table)."""
    if table is None:
        return "No answers for the test images: the leaderboard will tell."
    r = table.iloc[0]
    return (
        f"{int(r['test images'])} test images score {_n(r['test course F1'])}, {r['where']} "
        f"the 10-90% range predicted ({_n(r['10%'])} to {_n(r['90%'])})."
    )


def evidence(table: pd.DataFrame) -> str:
    """Each fixed setting's measured difference against its alternative (tools/evidence: held-out
    course F1, 90% interval), with the photos it was measured on."""
    d = "course F1 difference"
    return "\n".join(
        f"{r['setting']} against {r['against']}: {_gain(r[d], r[d + ' lo'], r[d + ' hi'])} "
        f"({r['photos']} photos, {r['protocol']})"
        for _, r in table.iterrows()
    )
