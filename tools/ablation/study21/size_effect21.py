"""Task 1a/1c of REPORT21.md: how the course F1 of fixed held-out predictions depends on the scored set.

Input: eval21.py's pooled held-out predictions of one recipe (``pooled/<recipe>_<rule>_s<seed>.npz``:
outer 5-fold CV, thresholds from inner out-of-fold scores, top class added), one file per seed.
For each size n: many random subsets of the 678 photos without replacement (and, separately,
bootstrap samples of n photos with replacement, as a bootstrap over a test set of n photos
would draw) -> mean and sd of course, macro and micro F1, and what the course weights do at
that size (classes present, share of the weight on classes with 1-2 positives in the set,
weighted share of classes whose precision and recall are zeroed by tp = 0).

Then the validation split's repair pass (``split.repair_split``: every class with >= 2 photos
gets one on each side): subsets of ``--val-size`` photos drawn at random, and the same draws
after the repair pass has moved photos into them (as ``split.stratified_split`` does), scored
from the same predictions.

    PYTHONPATH=. python research/size_effect21.py --recipe base --seeds 0,1,2
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools" / "ablation"), str(REPO), str(REPO / "research")]

from common import add_dir_argument, work_dir  # noqa: E402
from cocochallenge import split  # noqa: E402
from eval21 import subset_draws, subset_scores  # noqa: E402


def weight_profile(Y, pred, D):
    """Per draw: classes present, weight share of classes with 1-2 positives, weight share of zeroed classes."""
    y, p = Y.astype(bool), pred.astype(bool)
    pos = D @ y.astype(float)
    tp = D @ (y & p).astype(float)
    w = np.where(pos > 0, 1.0 / np.maximum(pos, 1), 0.0)
    w = w / w.sum(1, keepdims=True)
    return {"classes_present": (pos > 0).sum(1).mean(),
            "weight_on_1-2_positives": (w * ((pos > 0) & (pos <= 2))).sum(1).mean(),
            "weight_on_tp0": (w * ((pos > 0) & (tp == 0))).sum(1).mean()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dir_argument(ap)
    ap.add_argument("--recipe", default="base")
    ap.add_argument("--rule", default="shrink10")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sizes", default="32,64,96,100,150,200,300,400,500,678")
    ap.add_argument("--draws", type=int, default=5000)
    ap.add_argument("--val-size", type=int, default=68, help="the random part of the notebook's validation split")
    ap.add_argument("--repair-draws", type=int, default=1000)
    args = ap.parse_args()
    out = work_dir(args.dir)
    Y = np.load(out / "feats" / "labels.npy").astype(bool)
    N = len(Y)
    seeds = [int(s) for s in args.seeds.split(",")]
    preds = {s: np.load(out / "pooled" / f"{args.recipe}_{args.rule}_s{s}.npz")["pred"] for s in seeds}
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        acc = {}
        for s in seeds:
            D = subset_draws(N, n, args.draws if n < N else 1, 100 + s)
            c, ma, mi = subset_scores(Y, preds[s], D)
            rng = np.random.default_rng([200 + s, n])
            B = rng.multinomial(n, np.full(N, 1.0 / N), size=args.draws).astype(float)
            cb = subset_scores(Y, preds[s], B)[0]
            for k, v in {"course": c.mean(), "course_sd": c.std(), "course_p10": np.quantile(c, 0.1),
                         "course_p90": np.quantile(c, 0.9), "course_boot_sd": cb.std(), "course_boot_mean": cb.mean(),
                         "macro": ma.mean(), "micro": mi.mean(), **weight_profile(Y, preds[s], D)}.items():
                acc.setdefault(k, []).append(v)
        rows.append({"n": n, **{k: float(np.mean(v)) for k, v in acc.items()}})
    t = pd.DataFrame(rows)
    pd.set_option("display.width", 250)
    print(f"recipe {args.recipe}, rule {args.rule}, seeds {seeds}, {args.draws} draws per size and seed "
          "(means over seeds)")
    print(t.round(4).to_string(index=False))
    t.round(5).to_csv(out / f"size_effect21_{args.recipe}_s{args.seeds.replace(',', '')}.csv", index=False)

    # the repair pass of the validation split
    res = {"random": [], "repaired": [], "size_after_repair": []}
    for s in seeds:
        rng = np.random.default_rng(300 + s)
        for _ in range(args.repair_draws):
            side = np.zeros(N, dtype=np.int8)
            side[rng.choice(N, args.val_size, replace=False)] = 1
            D = side[None, :].astype(float)
            res["random"].append(subset_scores(Y, preds[s], D)[0][0])
            split.repair_split(Y, side)
            res["repaired"].append(subset_scores(Y, preds[s], side[None, :].astype(float))[0][0])
            res["size_after_repair"].append(int(side.sum()))
    r = {k: (float(np.mean(v)), float(np.std(v))) for k, v in res.items()}
    print(f"\nvalidation split of {args.val_size} random photos: course F1 {r['random'][0]:.4f} (sd {r['random'][1]:.4f}); "
          f"after the repair pass ({r['size_after_repair'][0]:.1f} photos): {r['repaired'][0]:.4f} "
          f"(sd {r['repaired'][1]:.4f}); paired difference {np.mean(np.subtract(res['repaired'], res['random'])):.4f}")
    pd.DataFrame(res).to_csv(out / f"repair21_{args.recipe}_s{args.seeds.replace(',', '')}.csv", index=False)


if __name__ == "__main__":
    main()
