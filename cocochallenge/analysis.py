"""Analysis tables: what the challenge notebook saved, read back and turned into numbers.

The analysis notebook trains nothing and reads only the run folder. Everything here turns
the saved validation scores into tables with the metric code of :mod:`cocochallenge.metrics`
(never a second copy of it), so every number in the analysis is one the challenge notebook
could have chosen its thresholds and its submission with. The figures are in
:mod:`cocochallenge.plots`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoints import PhaseCheckpoint
from .compare import compare, cross_fitted, held_out_course_f1
from .config import CLASSES
from .data import data_paths, load_rgb, read_label_matrix
from .files import SaysWhatToDo, load_json, load_npz
from .metrics import (
    COURSE_LOGIT_THRESHOLD_AS_PROB,
    THRESHOLD_GRID,
    apply_thresholds,
    course_scores,
)
from .runs import BASELINE, head_folder, load_scores
from .runs import views as runs_views

#: The evidence behind the notebook's fixed settings (tools/evidence/README.md): one paired
#: comparison per setting, held-out course F1 with its 90% interval.
EVIDENCE = Path(__file__).resolve().parents[1] / "tools" / "evidence" / "evidence.csv"


class RunNotFound(SaysWhatToDo, FileNotFoundError):
    """The run folder lacks what the challenge notebook writes; shown as its message alone."""


def _view(saved: dict) -> str:
    """The view a model's thresholds were tuned on: ``plain`` or ``flip TTA`` (runs written
    before the view was chosen per model recorded a ``tta`` flag)."""
    return saved.get("view") or ("flip TTA" if saved.get("tta", True) else "plain")


class RunArtifacts:
    """What the challenge notebook saved in a run folder, read once and checked.

    The analysis needs, per model, the validation probabilities (plain and flip-TTA), the
    targets, the history and ``result.json``, plus the run's config, summary, split and the
    thresholds of the submission. ``probs`` holds each model's probabilities in the view the
    run kept for it (``views``: plain or flip TTA) and, with two or more networks, those of the
    ensemble, exactly as the challenge notebook builds them (:func:`runs.views`). A missing
    file is reported with what writes it: the usual cause is a run folder whose challenge
    notebook has not finished.
    """

    def __init__(self, run_dir: Path | str):
        self.run_dir = Path(run_dir).expanduser()
        hint = f"run challenge.ipynb to the end with RUN_DIR={self.run_dir} first"
        missing = [
            n
            for n in ("config.json", "summary.json", "split.json", "thresholds.json")
            if not (self.run_dir / n).is_file()
        ]
        if missing:
            raise RunNotFound(f"{self.run_dir}: {', '.join(missing)} not found: {hint}")
        self.config = load_json(self.run_dir / "config.json")
        self.summary = load_json(self.run_dir / "summary.json")
        self.split = load_json(self.run_dir / "split.json")
        self.saved_thresholds = load_json(self.run_dir / "thresholds.json")
        self.names = list(self.config["backbones"])
        self.at_least_one = bool(self.config.get("at_least_one", True))
        self.shrink = float(self.config.get("shrink", 10))
        self.val, self.results, self.history = {}, {}, {}
        for name in self.names:
            folder = self.run_dir / "models" / name
            for f in ("val_scores.npz", "result.json", "history.json"):
                if not (folder / f).is_file():
                    raise RunNotFound(f"{folder / f} not found (model {name} unfinished): {hint}")
            self.val[name] = load_scores(self.run_dir, name, "val")
            self.results[name] = load_json(folder / "result.json")
            self.history[name] = load_json(folder / "history.json")
        first = self.val[self.names[0]]
        self.targets = np.asarray(first["targets"]).astype(np.uint8)
        self.stems = [str(s) for s in first["stems"]]
        for name in self.names[1:]:
            if [str(s) for s in self.val[name]["stems"]] != self.stems:
                raise ValueError(
                    f"{name}'s validation images differ from {self.names[0]}'s: "
                    "the models of one run must share its split"
                )
        # each model's probabilities in the view the run kept for it (plain or flip TTA)
        views = runs_views(self.val, self.names)
        absent = [m for m in views if m not in self.saved_thresholds]
        if absent:
            raise ValueError(f"thresholds.json has no entry for {absent}: {hint}")
        self.views = {m: _view(self.saved_thresholds[m]) for m in views}
        self.probs = {m: views[m][self.views[m]] for m in views}
        self.models = list(self.probs)
        self.thresholds = {
            m: np.asarray(self.saved_thresholds[m]["per_class"], dtype=float) for m in self.models
        }
        self.global_thresholds = {m: float(self.saved_thresholds[m]["global"]) for m in self.models}
        self.data_root = Path(self.summary.get("data_root") or self.config.get("data_root") or ".")
        # the kept frozen head's validation probabilities (no flip), beside the kept model's,
        # and those of the same head trained with other seeds (``seed<k>/``), when kept
        self.frozen_probs, self.seed_probs = {}, {}
        for name in self.names:
            folder = self.run_dir / "models" / name
            head = head_folder(folder, self.results[name].get("head", "mlp"))
            probs = PhaseCheckpoint(head, "frozen", {}).best_val_probs()
            if probs is None:
                continue
            self.frozen_probs[name] = np.asarray(probs)
            seeds = {int(self.config.get("seed", 0)): self.frozen_probs[name]}
            for path in folder.glob("seed*/frozen_best.pt"):
                kept = PhaseCheckpoint(path.parent, "frozen", {}).best_val_probs()
                seeds[int(path.parent.name[4:])] = np.asarray(kept)
            self.seed_probs[name] = dict(sorted(seeds.items()))
        # the course's recipe on each network's features (challenge.ipynb, section 8)
        self.baselines = {}
        for name in self.names:
            folder = self.run_dir / BASELINE / name
            if (folder / "val_scores.npz").is_file():
                probs = load_npz(folder / "val_scores.npz")["probs"]
                self.baselines[name] = {"probs": probs, **load_json(folder / "result.json")}

    def chosen(self, name: str = "") -> str:
        """``name`` if given (checked), else the model the challenge notebook submitted."""
        name = name or self.summary.get("chosen") or self.models[-1]
        if name not in self.models:
            raise ValueError(f"{name!r} is not a model of this run: {self.models}")
        return name

    def predictions(self, name: str) -> np.ndarray:
        """The binary validation predictions of ``name`` as the submission makes them."""
        return apply_thresholds(self.probs[name], self.thresholds[name], self.at_least_one)

    def image_path(self, stem: str) -> Path:
        return data_paths(self.data_root)["train_images"] / f"{stem}.jpg"

    def train_labels(self) -> np.ndarray | None:
        """Labels of the run's training images (its split), or None when the data is not here.

        Read from the label files, because the run folder stores only the validation
        targets; the analysis can then run on a machine without the course data, with the
        figures that need it left out.
        """
        folder = data_paths(self.data_root)["train_labels"]
        names = [f"{s}.cls" for s in self.split["train"]]
        if not folder.is_dir() or not names or not (folder / names[0]).is_file():
            return None
        return read_label_matrix(folder, names)


def phase_summary(history: dict) -> pd.DataFrame:
    """Per model and phase, from the saved histories (``{model: [epoch rows]}``): epochs run,
    seconds per epoch, the epoch of the best validation mAP (the one kept) and of the lowest
    validation loss, and the last epoch's losses and mAPs on training images (no augmentation)
    and on validation.

    It says in numbers what the training curves show: whether fine-tuning beat the frozen
    backbone (and whether the weights' moving average beat the raw weights: ``best EMA mAP``,
    when a run kept one), at what cost per epoch, and whether the model over-fits (training
    loss falling far below a validation loss that rises after its lowest epoch).
    """
    rows = []
    for name, hist in history.items():
        for phase in ("frozen", "finetune"):
            rs = [r for r in hist if str(r.get("phase")).startswith(phase) and "val_loss" in r]
            if not rs:
                continue
            best = max(rs, key=lambda r: r["val_mAP"])
            low = min(rs, key=lambda r: r["val_loss"])
            rows.append(
                {
                    "model": name,
                    "phase": phase,
                    "epochs": len(rs),
                    "s/epoch": float(np.mean([r.get("seconds", np.nan) for r in rs])),
                    "best val mAP": best["val_mAP"],
                    "at epoch": best["epoch"],
                    "lowest val loss at epoch": low["epoch"],
                    "best EMA mAP": max(r.get("ema_mAP", np.nan) for r in rs),
                    "last train loss": rs[-1].get("train_loss", np.nan),
                    "last val loss": rs[-1]["val_loss"],
                    "last train mAP": rs[-1].get("train_mAP", np.nan),
                    "last val mAP": rs[-1]["val_mAP"],
                }
            )
    if not rows:  # heads fitted in one go (the CPU recipe): no epochs to summarise
        return pd.DataFrame()
    table = pd.DataFrame(rows).set_index(["model", "phase"])
    return table.drop(columns="best EMA mAP") if table["best EMA mAP"].isna().all() else table


def best_and_worst(report: pd.DataFrame, n: int = 10) -> tuple:
    """``(best, worst)``: the ``n`` classes with the highest and the lowest F1.

    Only classes with validation positives are ranked (F1 says nothing about a class that
    is absent); among equal F1 the better-supported class comes first, since its number is
    the more certain one.
    """
    r = report[report["support"] > 0]
    best = r.sort_values(["f1", "support"], ascending=[False, False], kind="stable").head(n)
    worst = r.sort_values(["f1", "support"], ascending=[True, False], kind="stable").head(n)
    return best, worst


def threshold_sweep(targets: np.ndarray, probs: np.ndarray, grid=THRESHOLD_GRID) -> pd.DataFrame:
    """Course F1, macro F1 and labels per image for one global threshold at each grid value.

    Course F1 comes from :func:`course_scores`; macro F1 from the same counts over the
    classes with positives, as :func:`evaluate_predictions` defines it (a test checks they
    agree). Counting once per threshold, instead of calling :func:`evaluate_predictions`
    (which also computes mAP), keeps a 97-point sweep of 6,500 images under a second.
    """
    y = np.asarray(targets).astype(bool)
    probs = np.asarray(probs)
    has = y.any(0)
    rows = []
    for t in grid:
        pred = probs > t
        tp, fp, pos = (y & pred).sum(0), (~y & pred).sum(0), y.sum(0)
        denom = 2 * tp + fp + (pos - tp)
        f1_c = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
        rows.append(
            {
                "threshold": float(t),
                "course_f1": course_scores(tp, fp, pos)["f1"],
                "macro_f1": float(f1_c[has].mean()) if has.any() else 0.0,
                "labels_per_image": float(pred.sum(1).mean()) if len(pred) else 0.0,
            }
        )
    return pd.DataFrame(rows)


#: A shrink so large that every class takes the global threshold: "one threshold", held out.
ONE_THRESHOLD = 1e12


def threshold_steps(
    targets: np.ndarray,
    probs: np.ndarray,
    probs_tta: np.ndarray | None,
    ensemble: np.ndarray | None = None,
    shrink: float = 10.0,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """What each step from the course's rule to the submission adds, held out, with intervals.

    Steps, each on top of the previous: the course's rule (raw output > 0.5), the sigmoid
    (probability > 0.5), one threshold for every class, per-class thresholds shrunk toward it,
    the top-1 guarantee, flip TTA (``probs_tta``; left out when None) and the ensemble (left
    out when None). A tuned step is scored held out (:func:`compare.cross_fitted`: every image
    predicted with thresholds chosen on the other half), so every row is the held-out course
    F1, the definition used everywhere in the notebooks. ``gain`` is each step minus the one
    before, with its 90% interval from the same paired bootstrap resamples of the images.
    """
    from .compare import Z, resamples, scores

    y = np.asarray(targets).astype(bool)
    held = lambda p, k, top1: cross_fitted(y, p, k, top1, seed=seed)  # noqa: E731
    steps = {
        "course rule: raw output > 0.5": [probs > COURSE_LOGIT_THRESHOLD_AS_PROB],
        "sigmoid: probability > 0.5": [probs > 0.5],
        "one threshold for every class": held(probs, ONE_THRESHOLD, False),
        f"per-class thresholds (shrunk by {shrink:g})": held(probs, shrink, False),
        "+ top-1 guarantee": held(probs, shrink, True),
    }
    if probs_tta is not None:
        steps["+ flip TTA"] = held(probs_tta, shrink, True)
    if ensemble is not None:
        steps["+ ensemble"] = held(ensemble, shrink, True)
    W = resamples(len(y), n_boot, seed)
    full = np.ones((1, len(y)), dtype=np.float32)
    rows, previous = [], None
    for step, preds in steps.items():
        draws = scores(y, preds, None, W)["course F1"]
        point = scores(y, preds, None, full)
        row = {"step": step, "held-out course F1": float(point["course F1"][0]),
               "macro F1": float(point["macro F1"][0]),
               "labels/image": float(np.mean([p.sum(1).mean() for p in preds]))}  # fmt: skip
        if previous is not None:
            gain, half = (
                row["held-out course F1"] - previous[0],
                Z * float(np.std(draws - previous[1])),
            )
            row.update({"gain": gain, "gain lo": gain - half, "gain hi": gain + half})
        rows.append(row)
        previous = (row["held-out course F1"], draws)
    return pd.DataFrame(rows).set_index("step")


def error_examples(
    targets: np.ndarray, pred: np.ndarray, probs: np.ndarray, cls: int, n: int = 3
) -> tuple:
    """``(false positives, false negatives)`` of class ``cls``: row indices, worst first.

    The most confident false positives and the most confidently missed positives (the
    positives the model scored lowest) are the instructive ones: a missing annotation, a
    look-alike class, an object too small to see.
    """
    y = np.asarray(targets)[:, cls].astype(bool)
    p = np.asarray(pred)[:, cls].astype(bool)
    s = np.asarray(probs)[:, cls]
    fp = np.flatnonzero(p & ~y)
    fn = np.flatnonzero(~p & y)
    return (fp[np.argsort(-s[fp], kind="stable")][:n], fn[np.argsort(s[fn], kind="stable")][:n])


def cooccurrence(Y: np.ndarray) -> np.ndarray:
    """``P[i, j]``: the fraction of images with class ``i`` that also have class ``j``.

    Conditional rather than raw counts, which would only repeat the class frequencies
    (person dominates every row). The diagonal (always 1) and rows of classes that never
    occur are NaN.
    """
    Y = np.asarray(Y, dtype=np.float64)
    C = Y.T @ Y
    n = np.diag(C).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        P = C / n[:, None]
    P[n == 0] = np.nan
    np.fill_diagonal(P, np.nan)
    return P


def cooccurrence_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two co-occurrence matrices over the entries both define.

    One number for "do the predictions combine classes the way the training data does?";
    NaN when fewer than three entries are defined in both or either is constant.
    """
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or a[ok].std() == 0 or b[ok].std() == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def label_count_table(targets: np.ndarray, pred: np.ndarray, cap: int = 10) -> pd.DataFrame:
    """Images by (true labels, predicted labels) count, counts above ``cap`` pooled as ``cap``."""
    t = np.minimum(np.asarray(targets).sum(1), cap)
    p = np.minimum(np.asarray(pred).sum(1), cap)
    table = pd.crosstab(pd.Series(t, name="true labels"), pd.Series(p, name="predicted labels"))
    full = range(0, int(max(t.max(initial=0), p.max(initial=0))) + 1)
    return table.reindex(index=full, columns=full, fill_value=0)


def points_lost(report: pd.DataFrame) -> pd.DataFrame:
    """Per class: its weight in the course metric and what it costs in precision and in recall.

    The course precision and recall are class averages weighted by 1/positives (classes with
    validation positives only), so ``weight * (1 - precision)`` and ``weight * (1 - recall)``
    add up to 1 - P and 1 - R of the course metric: sorted by their sum, the costliest classes.
    """
    has = report["support"] > 0
    w = np.where(has, 1.0 / report["support"].clip(lower=1), 0.0)
    w = w / w.sum() if w.sum() > 0 else w
    out = report[["class", "support", "precision", "recall"]].copy()
    out["weight"] = w
    out["lost precision"] = w * (1 - report["precision"])
    out["lost recall"] = w * (1 - report["recall"])
    out["lost total"] = out["lost precision"] + out["lost recall"]
    return out[has].sort_values("lost total", ascending=False)


def study(
    run: RunArtifacts, n_boot: int = 1000, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The networks, the ensemble and the course's recipe on the same validation images.

    ``(table, differences)`` of :func:`compare.compare`: held-out course F1, macro F1 and mAP
    with 90% paired-bootstrap intervals, then parameters, training minutes and images/s.
    The course's recipe on each network's features is scored as the course scores it (raw
    output > 0.5: nothing tuned).
    """
    models = {m: {"preds": cross_fitted(run.targets, run.probs[m], run.shrink, run.at_least_one),
                  "probs": run.probs[m]} for m in run.models}  # fmt: skip
    for name, base in run.baselines.items():  # scored as the course scores it: nothing tuned
        raw = apply_thresholds(base["probs"], COURSE_LOGIT_THRESHOLD_AS_PROB)
        models[f"course recipe on {name}"] = {"preds": [raw], "probs": base["probs"]}
    table, diffs = compare(run.targets, models, n_boot, seed)
    for m in table.index:
        members = run.names if m == "ensemble" else [m] if m in run.results else []
        res = [run.results[n] for n in members]
        speed = [r.get("val_images_per_second") or np.nan for r in res]
        table.loc[m, "params (M)"] = sum(r["parameters"] for r in res) / 1e6 if res else np.nan
        table.loc[m, "train (min)"] = sum(r["train_seconds"] for r in res) / 60 if res else np.nan
        table.loc[m, "images/s"] = 1.0 / sum(1.0 / v for v in speed) if res else np.nan
    return table, diffs


def frozen_against_finetuned(run: RunArtifacts, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per network: the best frozen head against the kept fine-tuned model, paired, without flip.

    Both are scored on the plain validation images (the frozen phase saw no mirror), so the
    difference is what fine-tuning bought. Networks whose kept model is the frozen head, or
    whose frozen scores were not saved, are left out.
    """
    rows = []
    for name in run.names:
        if name not in run.frozen_probs or not run.results[name]["best_phase"].startswith("fine"):
            continue
        pair = {phase: {"preds": cross_fitted(run.targets, probs, run.shrink, run.at_least_one),
                        "probs": probs}
                for phase, probs in (("frozen", run.frozen_probs[name]),
                                     ("fine-tuned", run.val[name]["probs"]))}  # fmt: skip
        table, diffs = compare(run.targets, pair, n_boot, seed, reference="frozen")
        d = diffs.loc["fine-tuned - frozen"]
        rows.append({"network": name, "frozen course F1": table.loc["frozen", "course F1"],
                     "fine-tuned course F1": table.loc["fine-tuned", "course F1"],
                     "gain": d["course F1"], "gain lo": d["course F1 lo"],
                     "gain hi": d["course F1 hi"], "beyond noise": d["course F1 beyond noise"],
                     "frozen mAP": table.loc["frozen", "mAP"],
                     "fine-tuned mAP": table.loc["fine-tuned", "mAP"], "mAP gain": d["mAP"],
                     "mAP gain lo": d["mAP lo"], "mAP gain hi": d["mAP hi"]})  # fmt: skip
    return pd.DataFrame(rows).set_index("network") if rows else pd.DataFrame()


def with_intervals(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Each score shown as ``value [lo, hi]``; other columns as they are."""
    out = pd.DataFrame(index=table.index)
    for col in table.columns:
        if col.endswith((" lo", " hi")):
            continue
        if f"{col} lo" in table:
            bounds = zip(table[col], table[f"{col} lo"], table[f"{col} hi"])
            out[col] = [
                f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" for v, lo, hi in bounds
            ]
        else:
            out[col] = table[col]
    return out


def grad_cam(model, images, classes) -> np.ndarray:
    """Where the network looks: Grad-CAM maps ``(N, H, W)`` in [0, 1], one per image and class.

    The feature map of the backbone's last stage (:func:`models.cam_layer`), weighted per
    channel by the mean gradient of the class's logit, summed, kept where positive, scaled to
    the image: Selvaraju et al. (2017), written here in a few lines instead of a dependency.
    """
    import torch

    from .models import cam_layer

    layer, kept = cam_layer(model), {}
    hook = layer.register_forward_hook(lambda m, i, o: kept.update(maps=o))
    model.eval()
    try:
        x = images.clone().requires_grad_(True)  # gradients reach the map whatever is frozen
        with torch.enable_grad():
            logits = model(x)
            maps = kept["maps"]
            picked = logits[torch.arange(len(x)), torch.as_tensor(classes)].sum()
            grads = torch.autograd.grad(picked, maps)[0]
    finally:
        hook.remove()
    weights = grads.mean((2, 3), keepdim=True)
    cam = torch.relu((weights * maps).sum(1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear")[:, 0]
    top = cam.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    return (cam / top).numpy()


def confident_errors(targets: np.ndarray, probs: np.ndarray, thresholds, n: int = 4) -> list:
    """``[(row, class, "FP" or "FN")]``: the most confident false positives and the most
    confidently missed positives (lowest probability) of a model, half each, worst first."""
    y = np.asarray(targets).astype(bool)
    pred = apply_thresholds(probs, thresholds)
    rows, cols = np.nonzero(pred & ~y)
    fps = sorted(zip(rows, cols), key=lambda rc: -probs[rc])[: (n + 1) // 2]
    rows, cols = np.nonzero(~pred & y)
    fns = sorted(zip(rows, cols), key=lambda rc: probs[rc])[: n // 2]
    return [(int(r), int(c), "FP") for r, c in fps] + [(int(r), int(c), "FN") for r, c in fns]


def caption(labels: np.ndarray, cls: int, kind: str, prob: float, width: int = 34) -> str:
    """A Grad-CAM caption: the error, its probability, then every true label of the image
    (wrapped, never cut: three labels of six would misread the image)."""
    import textwrap

    true = ", ".join(CLASSES[c] for c in np.flatnonzero(labels)) or "(none)"
    return "\n".join([f"{kind} {CLASSES[cls]} p={prob:.2f}",
                      *textwrap.wrap(f"true: {true}", width)])  # fmt: skip


def cams_for(run: RunArtifacts, name: str, errors: list, device: str = "cpu") -> tuple:
    """``(images as the network saw them, Grad-CAM maps)`` of the kept model ``name`` for each
    ``(row, class, kind)`` of ``errors`` (images of the run's data folder, its input size)."""
    import torch

    from .models import build_model, preprocess_for
    from .runs import load_kept_model
    from .transforms import build_transform

    kept = load_json(run.run_dir / "models" / name / "result.json")  # the CPU recipe's sizes
    backbone, size = kept.get("backbone", name), kept.get("img_size") or run.config.get("img_size")
    pre = preprocess_for(backbone, int(size or 0))
    dropout = float(run.config.get("dropout", 0.2))
    model, _ = build_model(backbone, head=kept.get("head", "mlp"), dropout=dropout)
    model = load_kept_model(run.run_dir, name, model).to(device)
    transform = build_transform(pre, pad=bool(run.config.get("pad", False)))
    pictures = [load_rgb(run.image_path(run.stems[r])) for r, _, _ in errors]
    x = torch.stack([transform(p) for p in pictures]).to(device)
    maps = grad_cam(model, x, [c for _, c, _ in errors])
    size = (pre["size"], pre["size"])
    return [p.resize(size) for p in pictures], maps


def seed_table(run: RunArtifacts, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per network: the held-out course F1 of its frozen head trained with each seed (same
    features, same split; the initialisation and batch order change), their mean and sample sd,
    beside the 90% bootstrap interval of the first seed's head: how much of a difference
    between networks is luck of a seed, and how much is luck of the images."""
    heads = {n: s for n, s in run.seed_probs.items() if len(s) > 1}
    if not heads:
        return pd.DataFrame()
    first = {n: next(iter(s.values())) for n, s in heads.items()}
    models = {n: {"preds": cross_fitted(run.targets, p, run.shrink, run.at_least_one),
                  "probs": None} for n, p in first.items()}  # fmt: skip
    table, _ = compare(run.targets, models, n_boot, seed)
    rows = {}
    for name, seeds in heads.items():
        f1 = {k: held_out_course_f1(run.targets, p, run.shrink, run.at_least_one)
              for k, p in seeds.items()}  # fmt: skip
        row = {f"seed {k}": v for k, v in f1.items()}
        half = table.loc[name, "course F1 hi"] - table.loc[name, "course F1"]
        row.update({"mean": float(np.mean(list(f1.values()))),
                    "sd over seeds": float(np.std(list(f1.values()), ddof=1)),
                    "bootstrap half-width (first seed)": float(half)})  # fmt: skip
        rows[name] = row
    return pd.DataFrame(rows).T


def class_weights(Y: np.ndarray) -> pd.DataFrame:
    """Each class's weight in the course F1 on labels ``Y``: 1/positives, normalised over the
    classes present, sorted from the heaviest; with the cumulative share."""
    n = np.asarray(Y).sum(0).astype(float)
    w = np.where(n > 0, 1.0 / np.maximum(n, 1), 0.0)
    w = w / w.sum()
    table = pd.DataFrame({"class": CLASSES, "positives": n.astype(int), "weight": w})
    table = table[table["positives"] > 0].sort_values("weight", ascending=False, kind="stable")
    table["cumulative"] = table["weight"].cumsum()
    return table


#: Classes that look alike in COCO photos: a false positive of one where another of its group is
#: present reads as a confusion of look, not of context.
LOOK_ALIKE = {
    "vehicles": ("bicycle", "car", "motorcycle", "bus", "train", "truck"),
    "cutlery": ("fork", "knife", "spoon"),
    "drinks": ("bottle", "wine glass", "cup", "vase"),
    "seats": ("bench", "chair", "couch", "bed"),
    "animals": ("bird", "cat", "dog", "horse", "sheep", "cow", "bear"),
    "food": ("sandwich", "hot dog", "pizza", "donut", "cake"),
    "screens": ("tv", "laptop", "cell phone", "remote", "keyboard"),
}


def confusions(targets: np.ndarray, pred: np.ndarray, P_train: np.ndarray | None = None,
               n: int = 12, exclude: tuple = ("person",)) -> pd.DataFrame:  # fmt: skip
    """The commonest false positives explained by another class in the image: for each pair,
    the validation images where ``predicted`` was predicted but is absent while ``present``
    is there, its share of that class's false positives, how often the two come together in
    the training labels (``P_train``, :func:`cooccurrence`), and the look-alike group the two
    share (:data:`LOOK_ALIKE`), if any: a look (car for truck) or a context (fork beside
    knife). ``exclude``: classes not counted as ``present`` (person is in half the images:
    every false positive would "come with" it).
    """
    y, p = np.asarray(targets).astype(bool), np.asarray(pred).astype(bool)
    fp = (p & ~y).astype(np.int64)
    counts = fp.T @ y.astype(np.int64)  # [a, b]: images with a predicted wrongly and b present
    np.fill_diagonal(counts, 0)
    counts[:, [CLASSES.index(c) for c in exclude]] = 0
    group = {c: g for g, members in LOOK_ALIKE.items() for c in members}
    order = np.argsort(-counts, axis=None, kind="stable")[:n]
    rows = []
    for a, b in zip(*np.unravel_index(order, counts.shape)):
        if counts[a, b] == 0:
            break
        same = group.get(CLASSES[a]) if group.get(CLASSES[a]) == group.get(CLASSES[b]) else ""
        rows.append({"predicted (absent)": CLASSES[a], "present": CLASSES[b],
                     "images": int(counts[a, b]),
                     "share of its false positives": counts[a, b] / max(fp[:, a].sum(), 1),
                     "P(predicted | present), training":
                         np.nan if P_train is None else float(P_train[b, a]),
                     "look-alike group": same or ""})  # fmt: skip
    return pd.DataFrame(rows)


def test_against_expected(summary: dict) -> pd.DataFrame | None:
    """The test images' course F1 (when their answers exist) beside the range the challenge
    notebook predicted for a test set of that size; None without answers."""
    scored, expect = summary.get("test_scores"), summary.get("expected_course_f1")
    if not scored or not expect:
        return None
    f1 = scored["course_f1"]
    where = "below" if f1 < expect["p10"] else "above" if f1 > expect["p90"] else "inside"
    return pd.DataFrame({"test images": [scored["n_images"]], "test course F1": [f1],
                         "expected": [expect["expected"]], "10%": [expect["p10"]],
                         "90%": [expect["p90"]], "where": [where]})  # fmt: skip
