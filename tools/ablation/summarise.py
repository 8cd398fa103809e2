"""results_per_seed.csv -> results.csv (mean and sd over seeds per recipe x threshold rule x top1).

Why: ablate.py appends one row per recipe x seed x rule x top1 (reruns included); this keeps the
last row of each, averages over seeds and prints the table README.md quotes.
"""

import argparse
from pathlib import Path

import pandas as pd
from common import add_dir_argument, work_dir

ap = argparse.ArgumentParser(description=__doc__)
add_dir_argument(ap)
ap.add_argument("--inp", default="", help="default: <dir>/results_per_seed.csv")
ap.add_argument("--out", default="", help="default: <dir>/results.csv")
ap.add_argument("--show", default="", help="substring filter on recipe for printing")
ap.add_argument("--rules", default="", help="comma list of rules to print")
a = ap.parse_args()
d = work_dir(a.dir)
a.inp = a.inp or str(d / "results_per_seed.csv")
a.out = a.out or str(d / "results.csv")
Path(a.out).parent.mkdir(parents=True, exist_ok=True)
df = pd.read_csv(a.inp).drop_duplicates(["recipe", "rule", "top1", "seed"], keep="last")
g = df.groupby(["recipe", "rule", "top1"], sort=False)
out = g.agg(
    n_seeds=("seed", "nunique"),
    course_f1=("course_f1", "mean"),
    course_f1_sd=("course_f1", "std"),
    macro_f1=("macro_f1", "mean"),
    macro_f1_sd=("macro_f1", "std"),
    micro_f1=("micro_f1", "mean"),
    mAP=("mAP", "mean"),
    course_f1_foldmean=("course_f1_foldmean", "mean"),
    labels_per_img=("labels_per_img", "mean"),
    fit_s_per_outer_fold=("fit_s_per_outer_fold", "mean"),
    members=("members", "first"),
    ens=("ens", "first"),
).reset_index()
out.round(4).to_csv(a.out, index=False)
show = out[out.recipe.str.contains(a.show)] if a.show else out
if a.rules:
    show = show[show.rule.isin(a.rules.split(","))]
pd.set_option("display.width", 250)
pd.set_option("display.max_rows", 500)
print(show.drop(columns=["members", "ens"]).round(3).to_string(index=False))
