"""results21.csv -> the tables of REPORT21.md, with paired differences against a reference recipe.

Why: the seed-to-seed sd of a recipe only measures how the fold partition moves the score on
the same 678 photos; whether a gain would hold on other photos needs the photos resampled.
For each recipe this prints mean and sd over seeds (course, macro, micro F1, mAP, the course
F1 expected on test sets of 100/150/300 photos), the paired difference to ``--ref`` per seed
(same folds, same subsets), and a paired bootstrap over photos: the 678 held-out predictions of
both recipes (``pooled/*.npz`` of eval21.py) resampled with replacement, the same resample for
both and every seed, the course F1 difference averaged over seeds; its sd and the share of
resamples where the difference is <= 0 say how far the gain is above the noise of which photos
were drawn.

    PYTHONPATH=. python research/summarise21.py --ref base [--only a,b,c] [--boot 2000]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools" / "ablation"), str(REPO), str(REPO / "research")]

from common import add_dir_argument, work_dir  # noqa: E402
from eval21 import subset_scores  # noqa: E402


def bootstrap_weights(n, boot, seed=0):
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=boot).astype(np.float64)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dir_argument(ap)
    ap.add_argument("--inp", default="", help="comma list of eval21.py result files (default: <dir>/results21.csv)")
    ap.add_argument("--ref", default="base")
    ap.add_argument("--only", default="")
    ap.add_argument("--rule", default="shrink10")
    ap.add_argument("--seeds", default="", help="only these seeds (comma list); default all a recipe has")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--csv", default="", help="also write the table here")
    args = ap.parse_args()
    out = work_dir(args.dir)
    df = pd.concat([pd.read_csv(f) for f in (args.inp or str(out / "results21.csv")).split(",")])
    df = df[df.rule == args.rule].drop_duplicates(["recipe", "seed"], keep="last")
    if args.seeds:
        df = df[df.seed.isin([int(s) for s in args.seeds.split(",")])]
    names = list(dict.fromkeys(df.recipe)) if not args.only else args.only.split(",")
    Y = np.load(out / "feats" / "labels.npy").astype(bool)
    W = bootstrap_weights(len(Y), args.boot)
    ref = df[df.recipe == args.ref].set_index("seed")
    ref_boot = {}
    for s in ref.index:
        z = np.load(out / "pooled" / f"{args.ref}_{args.rule}_s{s}.npz")
        ref_boot[s] = subset_scores(Y, z["pred"], W)[0]
    rows = []
    for name in names:
        d = df[df.recipe == name].set_index("seed")
        if d.empty:
            continue
        row = {"recipe": name, "seeds": len(d)}
        for col in ("course_f1", "macro_f1", "micro_f1", "mAP", "course_n100", "course_n150", "course_n300"):
            row[col] = d[col].mean()
            row[col + "_sd"] = d[col].std()
        row["n150_sd_over_subsets"] = d["course_n150_sd"].mean()
        common = [s for s in d.index if s in ref.index]
        diff = d.loc[common, "course_f1"] - ref.loc[common, "course_f1"]
        row["d_course"], row["d_course_sd_seeds"] = diff.mean(), diff.std()
        d150 = d.loc[common, "course_n150"] - ref.loc[common, "course_n150"]
        row["d_n150"], row["d_n150_sd_seeds"] = d150.mean(), d150.std()
        boots = []
        for s in common:
            z = np.load(out / "pooled" / f"{name}_{args.rule}_s{s}.npz")
            boots.append(subset_scores(Y, z["pred"], W)[0] - ref_boot[s])
        b = np.mean(boots, 0)
        row["d_course_boot_sd"], row["p_boot_le0"] = b.std(), float((b <= 0).mean())
        row["fit_s_per_outer_fold"] = d["fit_s_per_outer_fold"].mean()
        rows.append(row)
    t = pd.DataFrame(rows)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_rows", 500)
    show = t[["recipe", "seeds", "course_f1", "course_f1_sd", "macro_f1", "micro_f1", "mAP", "course_n100",
              "course_n150", "course_n300", "d_course", "d_course_sd_seeds", "d_n150", "d_course_boot_sd",
              "p_boot_le0", "fit_s_per_outer_fold"]]
    print(show.round(4).to_string(index=False))
    if args.csv:
        t.round(5).to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
