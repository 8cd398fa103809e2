"""Figures of both notebooks (matplotlib); each can be saved as a PNG under the run folder.

A handed-in notebook's figures are also wanted as files (report, slides), and one folder per
run keeps them beside the scores they were drawn from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .analysis import error_examples
from .config import CLASSES
from .data import DataError, load_rgb
from .files import CannotWrite, atomic_path, load_json
from .metrics import COURSE_LOGIT_THRESHOLD_AS_PROB

if TYPE_CHECKING:
    import pandas as pd


def plot_history(run_dir: Path | str, names: list[str]):
    """Loss, mAP and course F1 at 0.5 per epoch for each model, training (without
    augmentation, dotted) against validation (solid); None when no model was trained by epochs.

    Fine-tuning is drawn from the epoch it starts from, the best frozen one (its first epoch is
    ``global_epoch`` = best frozen epoch + 1), so the two phases branch where they really do.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    keys = (("loss", "loss"), ("mAP", "mAP"), ("f1", "course F1 at 0.5"))
    drawn = False
    for i, name in enumerate(names):
        hist = load_json(Path(run_dir) / "models" / name / "history.json")
        hist = [r for r in hist if "train_loss" in r]  # a head fitted in one go has no epochs
        color = f"C{i}"
        for phase, marker in (("frozen", "o"), ("finetune", "s")):
            rows = [r for r in hist if r["phase"].startswith(phase)]  # frozen_<head>
            if not rows:
                continue
            drawn = True
            x = [r["global_epoch"] for r in rows]
            for ax, (key, _) in zip(axes, keys):
                label = f"{name} ({'frozen' if phase == 'frozen' else 'fine-tuned'})"
                ax.plot(x, [r[f"val_{key}"] for r in rows], "-", marker=marker, ms=3,
                        color=color, label=label)  # fmt: skip
                if f"train_{key}" in rows[0]:
                    ax.plot(x, [r[f"train_{key}"] for r in rows], ":", color=color, lw=1.2)
    if not drawn:  # no model trained by epochs (the CPU recipe fits its heads in one go)
        plt.close(fig)
        return None
    for ax, (_, title) in zip(axes, keys):
        ax.set_title(f"{title} (dotted: training images)")
        ax.set_xlabel("epoch (fine-tuning counted from the best frozen epoch)")
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()  # one legend for the three panels
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=10,
               frameon=False, bbox_to_anchor=(0.5, -0.02))  # fmt: skip
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def save_figure(fig, run_dir: Path | str, name: str, dpi: int = 110, fmt: str = "png") -> Path:
    """Save ``fig`` as ``<run_dir>/figures/<name>.<fmt>`` (atomically) and return the path.

    A handed-in notebook's figures are also wanted as files (report, slides), and one folder
    per run keeps them beside the scores they were drawn from. Figures of photos are best
    saved as ``jpg``: a tenth of the PNG's size for the same look.
    """
    path = Path(run_dir) / "figures" / f"{name}.{fmt}"
    extra = {"pil_kwargs": {"quality": 80}} if fmt == "jpg" else {}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", **extra)
    return path


class Outputs:
    """The figures and tables of an analysis, saved under the run folder as they are shown
    (``figures/<name>.png``, ``tables/<name>.csv``); ``paths`` lists the files saved.

    The analysis only reads a run: where the run folder cannot be written (a teammate's
    folder, read-only here; a full disk), one note says so and the analysis goes on, each
    figure and table shown but not saved.
    """

    def __init__(self, run_dir: Path | str, log=print):
        self.run_dir, self.log, self.paths, self.failed = Path(run_dir), log, [], False

    def figure(self, fig, name: str, dpi: int = 110, fmt: str = "png") -> Path | None:
        """:func:`save_figure`; its path, or None when not saved."""
        return self._keep(lambda: save_figure(fig, self.run_dir, name, dpi, fmt))

    def table(self, table: pd.DataFrame, name: str) -> Path | None:
        """``table.to_csv`` atomically; its path, or None when not saved."""
        path = self.run_dir / "tables" / f"{name}.csv"

        def write():
            with atomic_path(path) as tmp:
                table.to_csv(tmp)
            return path

        return self._keep(write)

    def show(self, fig, name: str, fmt: str = "png") -> None:
        """Save ``fig`` (:meth:`figure`) and show it in the notebook: a figure of photos as
        the light JPEG it was saved as, where it was saved. Returns nothing: as a cell's last
        line it would print the path under the figure."""
        import matplotlib.pyplot as plt
        from IPython.display import Image, display

        path = self.figure(fig, name, fmt=fmt)
        if fmt == "jpg" and path is not None:
            plt.close(fig)
            display(Image(filename=str(path)))
        else:
            plt.show()

    def _keep(self, write) -> Path | None:
        if self.failed:
            return None
        try:
            self.paths.append(write())
            return self.paths[-1]
        except CannotWrite as err:
            self.failed = True
            self.log(
                f"note: the analysis goes on, its figures and tables shown but not saved: {err}"
            )
            return None


def plot_f1_vs_frequency(reports: dict, counts, xlabel: str = "training images of the class"):
    """Per-class F1 against class frequency (log scale), one colour per model.

    The course metric weighs classes by 1/positives, so the left of this plot (rare classes)
    is where the score is won or lost; the lines (median F1 per frequency bin) show whether a
    model fails the rare classes as a group or only a few of them. Classes without
    validation positives (F1 undefined, shown as 0 in the tables) are left out.
    """
    import matplotlib.pyplot as plt

    counts = np.asarray(counts, dtype=float)
    first = next(iter(reports.values()), None)
    has_pos = first["support"].to_numpy() > 0 if first is not None else np.ones(len(counts), bool)
    keep = (counts > 0) & has_pos
    fig, ax = plt.subplots(figsize=(9, 4.8))
    edges = (
        np.unique(np.geomspace(counts[keep].min(), counts[keep].max() * 1.0001, 7))
        if keep.any()
        else []
    )
    for i, (model, rep) in enumerate(reports.items()):
        f1 = rep["f1"].to_numpy(dtype=float)
        sc = ax.scatter(
            counts[keep], f1[keep], s=18, alpha=0.7, marker="os^Dv<>"[i % 7], label=model
        )
        if len(edges) > 2:
            mids, meds = [], []
            for a, b in zip(edges[:-1], edges[1:]):
                sel = keep & (counts >= a) & (counts < b)
                if sel.any():
                    mids.append(np.median(counts[sel]))
                    meds.append(np.median(f1[sel]))
            ax.plot(mids, meds, "-", color=sc.get_facecolor()[0][:3], lw=1.5)
    ax.set_xscale("log")
    ax.set_xlabel(f"{xlabel} (log scale)")
    ax.set_ylabel("F1 at the model's per-class thresholds")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("per-class F1 against class frequency (lines: median per frequency bin)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_threshold_sweep(sweeps: dict, chosen: dict | None = None):
    """Course F1 and macro F1 against one global threshold, one line per model.

    Dotted: 0.5 on probabilities; dashed: the course's 0.5 on raw outputs (0.62 as a
    probability); a dot marks each model's best global threshold (``chosen``). The course
    metric peaks far lower than macro F1 because its rare classes want low thresholds.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharex=True)
    for model, sw in sweeps.items():
        for ax, col in zip(axes, ("course_f1", "macro_f1")):
            (line,) = ax.plot(sw["threshold"], sw[col], label=model)
            if chosen and model in chosen:
                i = int(np.argmin(np.abs(sw["threshold"].to_numpy() - chosen[model])))
                ax.plot(sw["threshold"].iloc[i], sw[col].iloc[i], "o", color=line.get_color())
    for ax, title in zip(axes, ("course F1 (leaderboard metric)", "macro F1")):
        ax.axvline(0.5, color="grey", ls=":", lw=1)
        ax.axvline(COURSE_LOGIT_THRESHOLD_AS_PROB, color="grey", ls="--", lw=1)
        ax.set_title(f"{title} against one global threshold")
        ax.set_xlabel("threshold on the probability")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_threshold_distribution(thresholds: dict, support, global_thresholds: dict | None = None):
    """The per-class thresholds: their histogram, and each against the class's support.

    Each class's threshold is pulled toward the global one by how few positives it has
    (:func:`~cocochallenge.metrics.shrunk_thresholds`): the right panel shows the rare classes
    gathering at the global threshold, and whether frequent classes want other thresholds.
    """
    import matplotlib.pyplot as plt

    support = np.asarray(support, dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    bins = np.linspace(0, 1, 41)
    rng = np.random.default_rng(0)
    jitter = np.exp(rng.uniform(-0.08, 0.08, len(support)))
    for i, (model, thr) in enumerate(thresholds.items()):
        line = axes[0].hist(thr, bins=bins, histtype="step", lw=1.5, label=model)[2][0]
        colour = line.get_edgecolor()
        axes[1].scatter(
            np.maximum(support, 0.8) * jitter,
            thr,
            s=14,
            alpha=0.7,
            color=colour,
            marker="os^Dv<>"[i % 7],
            label=model,
        )
        if global_thresholds and model in global_thresholds:
            axes[0].axvline(global_thresholds[model], color=colour, ls="--", lw=1)
    axes[0].set_title("per-class thresholds (dashed: the global threshold)")
    axes[0].set_xlabel("threshold")
    axes[0].set_ylabel("classes")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("validation positives of the class (log scale)")
    axes[1].set_ylabel("threshold")
    axes[1].set_title("threshold against class support")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_threshold_steps(steps: pd.DataFrame):
    """The steps table (:func:`analysis.threshold_steps`) as bars: the held-out course F1 of
    each step, labelled with its gain over the step before and that gain's 90% interval."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.55 * len(steps) + 1.4))
    y = np.arange(len(steps))[::-1].astype(float)
    f1 = steps["held-out course F1"].to_numpy(dtype=float)
    ax.barh(y, f1, height=0.6, color="#4c72b0")
    for yi, (_, row) in zip(y, steps.iterrows()):
        gain = row.get("gain", np.nan)
        text = f"{row['held-out course F1']:.3f}"
        if np.isfinite(gain):
            text += f"  ({gain:+.3f} [{row['gain lo']:+.3f}, {row['gain hi']:+.3f}])"
        ax.text(row["held-out course F1"] + 0.005, yi, text, va="center", fontsize=9)
    ax.set_yticks(y, steps.index, fontsize=9)
    ax.set_xlim(0, min(1.0, np.nanmax(f1) * 1.45) if np.nanmax(f1) > 0 else 1.0)
    ax.set_xlabel("held-out course F1 (gain over the step above, with its 90% interval)")
    ax.set_title("from the course's rule to the submission, step by step")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_class_weights(weights: pd.DataFrame, n: int = 30):
    """Each class's weight in the course F1 (:func:`analysis.class_weights`), the ``n`` heaviest
    as bars, and the cumulative share of all classes as a line: a few rare classes decide it."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 4))
    top = weights.head(n)
    ax.bar(range(len(top)), top["weight"], color="#4c72b0")
    ax.set_xticks(range(len(top)), [f"{c} ({k})" for c, k in zip(top["class"], top["positives"])],
                  rotation=60, ha="right", fontsize=9)  # fmt: skip
    ax.set_ylabel("weight in the course F1")
    share = ax.twinx()
    share.plot(range(len(top)), top["cumulative"], "o-", color="#dd8452", ms=3)
    share.set_ylim(0, 1)
    share.set_ylabel("cumulative share", color="#dd8452")
    ax.set_title(
        f"the {len(top)} heaviest classes (positives in brackets) and their cumulative share"
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _names(
    row: np.ndarray, first: int | None = None, scores=None, limit: int = 4, width: int = 40
) -> str:
    """Class names of one image's labels: ``first`` leading (the class the row is about),
    the rest by descending ``scores`` when given; at most ``limit`` names and about ``width``
    characters (a caption under a small image), then a count of the rest."""
    idx = np.flatnonzero(row)
    if scores is not None:
        idx = idx[np.argsort(-np.asarray(scores)[idx], kind="stable")]
    if first is not None and first in idx:
        idx = np.r_[first, idx[idx != first]]
    shown = []
    for i in idx[:limit]:
        if shown and len(", ".join(shown + [CLASSES[i]])) > width:
            break
        shown.append(CLASSES[i])
    text = ", ".join(shown)
    return (text + f" +{len(idx) - len(shown)}" if len(idx) > len(shown) else text) or "(none)"


def plot_error_grid(
    image_paths, targets: np.ndarray, pred: np.ndarray, probs: np.ndarray, classes, n: int = 3
):
    """For each class, its ``n`` worst false positives and ``n`` worst false negatives.

    Each image shows the class's probability and, below, the image's true and predicted
    labels (the row's class first, predictions by probability): whether a "false" positive
    is a missing annotation or a real confusion can often be read off the picture.
    ``image_paths[i]`` is the file of validation row ``i``; a missing file gives a grey tile,
    so the figure still says which image it was.
    """
    import matplotlib.pyplot as plt

    classes = list(classes)
    fig, axes = plt.subplots(
        max(len(classes), 1),
        2 * n,
        figsize=(2.3 * 2 * n, 2.75 * max(len(classes), 1)),
        squeeze=False,
    )
    for row, c in enumerate(classes):
        fps, fns = error_examples(targets, pred, probs, c, n)
        for col in range(2 * n):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            kind, items = ("false positive", fps) if col < n else ("false negative", fns)
            k = col if col < n else col - n
            if col == 0:
                ax.set_ylabel(CLASSES[c], fontsize=10, fontweight="bold")
            if k >= len(items):
                ax.text(0.5, 0.5, f"no {kind}", ha="center", va="center", fontsize=8, color="grey")
                for sp in ax.spines.values():
                    sp.set_visible(False)
                continue
            i = int(items[k])
            path = Path(image_paths[i])
            try:
                img = load_rgb(path)
                img.thumbnail((200, 200))
                ax.imshow(img)
            except (OSError, DataError):
                ax.imshow(np.full((8, 8, 3), 0.85))
                ax.text(
                    0.5,
                    0.5,
                    f"{path.name}\nnot found",
                    ha="center",
                    va="center",
                    fontsize=7,
                    transform=ax.transAxes,
                )
            colour = "#c0392b" if col < n else "#2e6da4"
            ax.set_title(
                f"{'FP' if col < n else 'FN'}  p={probs[i, c]:.2f}", fontsize=8, color=colour
            )
            ax.set_xlabel(
                f"true: {_names(targets[i], c)}\npred: {_names(pred[i], c, probs[i])}", fontsize=6.5
            )
            for sp in ax.spines.values():
                sp.set_color(colour)
                sp.set_linewidth(2)
    fig.suptitle(
        "worst classes: most confident false positives (red) and most confidently "
        "missed positives, scored lowest (blue)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def plot_cooccurrence(matrices: dict, classes=None):
    """The co-occurrence matrices side by side, on ``classes`` (indices; default all 80).

    A square-root colour scale, so that the many weak pairs stay visible next to the strong
    ones (dining table with cup, fork, knife). Thirty classes keep their names legible at a
    notebook's width; 80 do not.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    k = max(len(matrices), 1)
    keep = np.arange(len(CLASSES)) if classes is None else np.asarray(classes)
    fig, axes = plt.subplots(1, k, figsize=(6.5 * k + 1, 6.8), squeeze=False, layout="constrained")
    im = None
    for ax, (title, P) in zip(axes[0], matrices.items()):
        P = np.asarray(P)[np.ix_(keep, keep)]
        im = ax.imshow(
            np.ma.masked_invalid(P),
            cmap="viridis",
            norm=PowerNorm(0.5, vmin=0, vmax=1),
            interpolation="nearest",
        )
        ticks = np.arange(len(keep))
        names = [CLASSES[c] for c in keep]
        size = 8 if len(keep) <= 40 else 5
        ax.set_xticks(ticks, names, rotation=90, fontsize=size)
        ax.set_yticks(ticks, names, fontsize=size)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("also in the image: class j")
        ax.set_ylabel("images with class i")
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.5, pad=0.01, label="P(class j | class i)")
    return fig


def plot_label_counts(table: pd.DataFrame, cap: int = 10):
    """The :func:`label_count_table` as a heatmap, true labels across, predicted labels up: on
    the diagonal the count is right, above it the model predicts more labels than the image
    has, below it fewer."""
    import matplotlib.pyplot as plt

    v = table.to_numpy().T  # rows: predicted labels, columns: true labels
    fig, ax = plt.subplots(figsize=(0.5 * v.shape[1] + 2.5, 0.45 * v.shape[0] + 1.8))
    ax.imshow(v, cmap="Blues", origin="lower", aspect="auto")
    for (i, j), n in np.ndenumerate(v):
        if n:
            color = "white" if n > v.max() / 2 else "black"
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color=color)
    m = min(v.shape) - 1
    ax.plot([-0.5, m + 0.5], [-0.5, m + 0.5], color="red", lw=0.8, ls="--")
    lab = lambda vals: [f"{x}+" if x == cap else str(x) for x in vals]  # noqa: E731
    ax.set_xticks(range(v.shape[1]), lab(table.index))
    ax.set_yticks(range(v.shape[0]), lab(table.columns))
    ax.set_xlabel("true labels per image")
    ax.set_ylabel("predicted labels per image")
    ax.set_title("images by true and predicted labels (above the dashed line: too many predicted)")
    fig.tight_layout()
    return fig


def plot_cost_accuracy(table: pd.DataFrame, cost: str = "train (min)"):
    """Held-out course F1 (with its 90% interval) against a cost, one point per model.

    The marker's area grows with the parameters; a model up and to the left is both better
    and cheaper. Models without the cost (the course's recipe trains no backbone) sit at
    the left edge, marked as such.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    known = table[cost].dropna()
    left = known.min() * 0.5 if len(known) else 0.1
    for name, row in table.iterrows():
        x = row[cost] if np.isfinite(row[cost]) else left
        y, lo, hi = row["course F1"], row["course F1 lo"], row["course F1 hi"]
        size = 40 + 8 * (row.get("params (M)") if np.isfinite(row.get("params (M)", np.nan)) else 0)
        ax.errorbar(x, y, yerr=[[y - lo], [hi - y]], fmt="none", ecolor="grey", capsize=3)
        ax.scatter([x], [y], s=size, zorder=3)
        label = name if np.isfinite(row[cost]) else f"{name} (no backbone trained)"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(8, 4), fontsize=10)
    ax.set_xscale("log")
    ax.set_xlabel(f"{cost} (log scale)")
    ax.set_ylabel("held-out course F1 (90% interval)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_cams(images, cams: dict, captions: list[str], titles: list[str] | None = None):
    """Each image beside the Grad-CAM map of every model over it (rows: images)."""
    import matplotlib.pyplot as plt

    n, k = len(images), len(cams)
    fig, axes = plt.subplots(max(n, 1), k + 1, figsize=(3 * (k + 1), 3.1 * max(n, 1)),
                             squeeze=False)  # fmt: skip
    for i, img in enumerate(images):
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(captions[i], fontsize=9)
        for j, (model, maps) in enumerate(cams.items(), 1):
            axes[i, j].imshow(img)
            axes[i, j].imshow(
                maps[i], cmap="jet", alpha=0.45, extent=(0, img.size[0], img.size[1], 0)
            )
            axes[i, j].set_title(model if titles is None else titles[j - 1], fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig
