"""Recipes of a recipe file under ablate.py's nested CV, plus the course F1 expected on smaller test sets.

Why: the course F1 weights each class by 1/positives, so its value depends on the size of the
scored set (task 1a of REPORT21.md); a hidden test set of 100-300 photos is scored at that size,
not at 678. For each recipe x seed this takes ablate.py's held-out predictions (outer 5-fold
multilabel-stratified CV, thresholds from the inner out-of-fold scores of the outer training
part; the member probabilities are cached by ``ablate.member_probs``) and reports, besides the
pooled metrics of the 678 images, the mean and sd of the course, macro and micro F1 over random
subsets (without replacement) of the pooled held-out predictions, for each size in ``--sizes``.
The subsets are the same for every recipe (one generator per seed and size): recipe differences
are paired.

Rows: ``<dir>/results21.csv`` (appended); pooled predictions: ``<dir>/pooled/<recipe>_<rule>_s<seed>.npz``.

    PYTHONPATH=. python research/eval21.py --recipes research/recipes21.txt --seeds 0,1,2
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools" / "ablation"), str(REPO)]

import ablate  # noqa: E402
from common import ResultsCSV, add_dir_argument, loadavg, work_dir  # noqa: E402
from cocochallenge import metrics as cm  # noqa: E402

SIZES = (32, 64, 100, 150, 200, 300)


def subset_draws(n_rows: int, size: int, draws: int, seed: int) -> np.ndarray:
    """(draws, n_rows) 0/1 matrix: each row one random subset of ``size`` rows, without replacement."""
    rng = np.random.default_rng([seed, size])
    keys = rng.random((draws, n_rows))
    idx = np.argpartition(keys, size - 1, axis=1)[:, :size]
    D = np.zeros((draws, n_rows), dtype=np.float64)
    np.put_along_axis(D, idx, 1.0, axis=1)
    return D


def subset_scores(Y, pred, D):
    """Course, macro and micro F1 of every subset (rows of ``D``), from per-class counts.

    Course F1 as ``cm.course_scores`` (classes without positives in the subset weigh 0); macro
    F1 over the classes with positives in the subset (``cm.evaluate_predictions``'s convention)."""
    y, p = Y.astype(bool), pred.astype(bool)
    tp = D @ (y & p).astype(float)
    fp = D @ (~y & p).astype(float)
    pos = D @ y.astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        prec_c = np.where(tp > 0, tp / (tp + fp), 0.0)
        rec_c = np.where(tp > 0, tp / np.maximum(pos, 1), 0.0)
        w = np.where(pos > 0, 1.0 / np.maximum(pos, 1), 0.0)
        w = w / w.sum(1, keepdims=True)
        P, R = (prec_c * w).sum(1), (rec_c * w).sum(1)
        course = np.where((P > 0) & (R > 0), 2 * P * R / (P + R), 0.0)
        f1_c = 2 * tp / (2 * tp + fp + (pos - tp))
        has = pos > 0
        macro = np.where(has, np.nan_to_num(f1_c), 0.0).sum(1) / has.sum(1)
        micro = 2 * tp.sum(1) / (2 * tp.sum(1) + fp.sum(1) + (pos - tp).sum(1))
    return course, macro, micro


def full_metrics(Y, P, pred):
    m = cm.evaluate_predictions(Y, P, 0.5)          # mAP only; the F1s below from ``pred``
    course, macro, micro = subset_scores(Y, pred, np.ones((1, len(Y))))
    return {"course_f1": float(course[0]), "macro_f1": float(macro[0]), "micro_f1": float(micro[0]),
            "mAP": m["mAP"], "labels_per_img": float(pred.sum(1).mean())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dir_argument(ap)
    ap.add_argument("--recipes", required=True)
    ap.add_argument("--only", default="")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--inner", type=int, default=5, help="inner folds (run.py's out-of-fold scores use 5)")
    ap.add_argument("--rules", default="shrink10", help="threshold rules (ablate.thresholds); top1 always on")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--out", default="")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = work_dir(args.dir)
    feats, probs = out / "feats", out / "probs"
    (out / "pooled").mkdir(exist_ok=True)
    Y = np.load(feats / "labels.npy").astype(np.int64)
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    folds, inner = ablate.make_folds(Y, seeds, args.folds, args.inner)
    draws = {(s, n): subset_draws(len(Y), n, args.draws, s) for s in seeds for n in sizes}
    with ResultsCSV(args.out or out / "results21.csv") as results:
        for name, members, ens in ablate.read_recipes(args.recipes, args.only):
            kind = ablate.recipe_kind(name, members)
            for s in seeds:
                la = loadavg()
                t0 = time.perf_counter()
                outs = [ablate.member_probs(m, s, folds[kind][s], Y, inner[kind], feats, probs) for m in members]
                val, oof = ablate.ensemble(outs, ens)
                for rule in args.rules.split(","):
                    pred, fold_f1 = ablate.pooled_predictions(rule, True, Y, val, oof, folds[kind][s])
                    np.savez_compressed(out / "pooled" / f"{name}_{rule}_s{s}.npz", val=val.astype(np.float32),
                                        pred=pred, oof=oof.astype(np.float32))
                    row = {"recipe": name, "rule": rule, "top1": 1, "seed": s, **full_metrics(Y, val, pred),
                           "course_f1_foldmean": float(np.mean(fold_f1))}
                    for n in sizes:
                        c, ma, mi = subset_scores(Y, pred, draws[(s, n)])
                        row.update({f"course_n{n}": c.mean(), f"course_n{n}_sd": c.std(),
                                    f"macro_n{n}": ma.mean(), f"micro_n{n}": mi.mean()})
                    row.update({"fit_s_per_outer_fold": round(sum(o[2] for o in outs), 2),
                                "inner": args.inner, "loadavg": la, "members": " & ".join(members), "ens": ens})
                    results.write(row)
                print(f"{name} seed {s}: course {row['course_f1']:.4f} n150 {row.get('course_n150', np.nan):.4f} "
                      f"({time.perf_counter() - t0:.0f}s, load {la})", flush=True)


if __name__ == "__main__":
    main()
