"""results21*.csv -> research/evidence_rows21.csv, in the columns of tools/ablation/evidence.csv.

One row per measured recipe of REPORT21.md (shrunk per-class thresholds k=10, top class added),
mean and sample sd over seeds; the exploration (seeds 0-2, results21.csv) and the pre-registered
final comparison (seeds 3-7, results21_final.csv) are separate rows with their protocol named.
"minutes per seed" is the head-fitting time of one seed (5 outer folds x (5 inner + 1) fits per
member, on this shared CPU), as in evidence.csv; it is not the run's cost (REPORT21.md, timing).

    PYTHONPATH=. python research/evidence21.py
"""
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "ablation"
OUT = REPO / "research" / "evidence_rows21.csv"
EXPLORE = "5-fold CV (inner 5-fold OOF thresholds), seeds 0-2, exploration"
FINAL = "5-fold CV (inner 5-fold OOF thresholds), seeds 3-7, pre-registered"

#: (step, what it backs, recipe); the recipes' members are in research/recipes21*.txt
STEPS = [
    ("CPU recipe of run.py: Lite0/1/2 native, resize, one view, logistic C=0.1, mean of probabilities",
     "baseline (current CPU_RECIPE)", "base"),
    ("  Lite0 alone, 224", "single backbone", "l0_224"),
    ("  Lite1 alone, 240", "single backbone", "l1_240"),
    ("  Lite2 alone, 260", "single backbone", "l2_260"),
    ("  Lite0, mean of image and mirror features", "TTA (CPU: off)", "l0_224_flip"),
    ("  Lite0 at 288 px", "IMG_SIZE", "l0_288"),
    ("  Lite0 at 320 px", "IMG_SIZE", "l0_320"),
    ("  Lite0 at 384 px", "IMG_SIZE", "l0_384"),
    ("  Lite0 at 448 px", "IMG_SIZE", "l0_448"),
    ("  Lite0 224 + 320 features concatenated", "multi-scale", "l0_224+320_cat"),
    ("  Lite0 224 + 320 features averaged", "multi-scale", "l0_224+320_mean"),
    ("  Lite0 224 + 384 features averaged", "multi-scale", "l0_224+384_mean"),
    ("  Lite0 224 and 384 heads, probabilities averaged", "multi-scale", "l0_224&384_prob"),
    ("  Lite0 full image + mean of 5 crops (60%: corners, centre), concatenated", "crops", "l0_crop60_catmean"),
    ("  Lite0 full image + max of 5 crops (60%), concatenated", "crops", "l0_crop60_catmax"),
    ("  Lite0 mean of full image and 5 crops (60%)", "crops", "l0_crop60_mean"),
    ("  Lite0 max of full image and 5 crops (60%)", "crops", "l0_crop60_max"),
    ("  Lite0 full image + mean of 4 quadrants (50%), concatenated", "crops", "l0_crop50_catmean"),
    ("  Lite0 mean of full image and 4 quadrants (50%)", "crops", "l0_crop50_mean"),
    ("  Lite0, C = 0.03", "LOGISTIC_C", "l0_C0.03"),
    ("  Lite0, C = 0.3", "LOGISTIC_C", "l0_C0.3"),
    ("  Lite0, C tuned on inner OOF mAP (0.01-1)", "LOGISTIC_C", "l0_Ctune"),
    ("  Lite1 at 320 px", "IMG_SIZE", "l1_320"),
    ("  Lite1 at 384 px", "IMG_SIZE", "l1_384"),
    ("  Lite2 at 320 px", "IMG_SIZE", "l2_320"),
    ("  Lite2 at 384 px", "IMG_SIZE", "l2_384"),
    ("  Lite2 at 448 px", "IMG_SIZE", "l2_448"),
    ("  Lite2 384, mean of image and mirror features", "TTA (CPU: off)", "l2_384_flip"),
    ("  Lite2 384, C = 0.03", "LOGISTIC_C", "l2_384_C0.03"),
    ("  Lite2 384, C = 0.3", "LOGISTIC_C", "l2_384_C0.3"),
    ("  Lite2 260 + 384 features concatenated", "multi-scale", "l2_260+384_cat"),
    ("  Lite2 384 and 448 heads, probabilities averaged", "multi-scale", "l2_384&448_prob"),
    ("  ensemble Lite0/1/2 all at 320", "IMG_SIZE", "ens_320"),
    ("  ensemble Lite0/1/2 all at 384", "IMG_SIZE", "ens_384"),
    ("  ensemble Lite0/1/2 native + all three at 320 (6 heads)", "CPU recipe members", "ens_native+320"),
    ("  ensemble Lite0/1/2 native + all three at 384 (6 heads)", "CPU recipe members", "ens_native+384"),
    ("  same 6 heads, mean of image and mirror features", "TTA (CPU: off)", "ens_native+384_flip"),
    ("  same 6 heads, mean of log-odds", "ensemble rule", "ens_native+384_logit"),
    ("  same 6 heads + Lite2 448 (7 heads)", "CPU recipe members", "ens_native+384+448"),
    ("  per backbone native and 384 features averaged (3 heads)", "multi-scale", "ens_ms384_mean"),
    ("  CPU recipe + Lite2 at 384 (4 heads)", "CPU recipe members", "ens_base+l2_384"),
    ("  Lite0 384, Lite1 240, Lite2 384 (3 heads)", "CPU recipe members", "ens_l0_384+l1_240+l2_384"),
    ("  Lite0 224, max pooling", "global pooling", "l0_224_max"),
    ("  Lite0 224, GeM pooling (p=3)", "global pooling", "l0_224_gem"),
    ("  Lite2 260, max pooling", "global pooling", "l2_260_max"),
    ("  Lite2 260, GeM pooling (p=3)", "global pooling", "l2_260_gem"),
    ("  Lite2 384, max pooling", "global pooling", "l2_384_max"),
    ("  Lite2 384, GeM pooling (p=3)", "global pooling", "l2_384_gem"),
    ("  Lite2 384, average and max pooling concatenated", "global pooling", "l2_384_avg+max_cat"),
    ("  Lite0 384, GeM pooling", "global pooling", "l0_384_gem"),
    ("  Lite1 240, GeM pooling", "global pooling", "l1_240_gem"),
    ("  Lite1 384, GeM pooling", "global pooling", "l1_384_gem"),
    ("  CPU recipe with GeM pooling (3 heads)", "global pooling", "ens_base_gem"),
    ("  CPU recipe + Lite2 384, GeM pooling (4 heads)", "global pooling", "ens_base+l2_384_gem"),
    ("  native + 384 (6 heads), GeM pooling", "global pooling", "ens_native+384_gem"),
]


def rows_from(path, protocol, only=None):
    if not path.exists():
        return []
    df = pd.read_csv(path)
    df = df[df.rule == "shrink10"].drop_duplicates(["recipe", "seed"], keep="last")
    out = []
    for step, backs, recipe in STEPS:
        if only is not None and recipe not in only:
            continue
        d = df[df.recipe == recipe]
        if d.empty:
            continue
        out.append({"step": step, "backs": backs, "protocol": protocol, "seeds": d.seed.nunique(),
                    "course F1": round(d.course_f1.mean(), 4), "course F1 sd": round(d.course_f1.std(), 4),
                    "macro F1": round(d.macro_f1.mean(), 4), "macro F1 sd": round(d.macro_f1.std(), 4),
                    "mAP": round(d.mAP.mean(), 4), "minutes per seed": round(d.fit_s_per_outer_fold.mean() * 5 / 60, 4),
                    "recipe": recipe, "rule": "shrink10", "top1": 1})
    return out


def main():
    rows = rows_from(RUNS / "results21.csv", EXPLORE)
    final = pd.read_csv(RUNS / "results21_final.csv").recipe.unique() if (RUNS / "results21_final.csv").exists() else []
    rows += rows_from(RUNS / "results21_final.csv", FINAL, set(final))
    extra = RUNS / "results21_pool.csv"
    rows += rows_from(extra, EXPLORE.replace("exploration", "exploration (global pooling)"))
    pd.DataFrame(rows).to_csv(OUT, index=False)
    print(f"{len(rows)} rows -> {OUT}")


if __name__ == "__main__":
    main()
