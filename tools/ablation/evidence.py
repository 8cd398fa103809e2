"""results_per_seed.csv -> evidence.csv: a row per default of the notebook, its measurement.

Why: the parameters cell's defaults each rest on a comparison measured on the 678 real photos
(ablate.py with recipes_defaults.txt, finetune.py); this picks those rows, averages them over
seeds (mean and sample sd) and writes the table that analysis.ipynb shows and README.md quotes.
A step whose rows are missing is left out with a warning, never filled in.

    python tools/ablation/evidence.py            # writes tools/ablation/evidence.csv
"""

import argparse
import sys
from pathlib import Path

import pandas as pd
from common import add_dir_argument, work_dir

HERE = Path(__file__).resolve().parent
OOF = "5-fold CV, thresholds out-of-fold"
HALVES = "80/20 split, thresholds on other half"
#: (step, the default it backs, recipe, threshold rule, top-1 guarantee, protocol)
STEPS = [
    ("course recipe: raw output > 0.5", "baseline", "course", "raw0.5", 0, OOF),
    ("+ sigmoid, probability > 0.5", "thresholds on probabilities", "course", "fixed0.5", 0, OOF),
    ("+ per-class thresholds (shrunk, k=10)", "SHRINK = 10", "course", "shrink10", 0, OOF),
    ("+ every image gets its top class", "AT_LEAST_ONE = True", "course", "shrink10", 1, OOF),
    ("+ stratified folds", "stratified split", "course_strat", "shrink10", 1, OOF),
    (
        "notebook head: MLP, AdamW, log-odds bias, flip TTA; resize",
        "HEAD = 'mlp', LR_HEAD",
        "nb_mlp_resize",
        "shrink10",
        1,
        OOF,
    ),
    ("  same, padded to a square", "PAD = False", "nb_mlp_pad", "shrink10", 1, OOF),
    ("  same, ASL instead of BCE", "LOSS = 'bce'", "nb_mlp_pad_asl", "shrink10", 1, OOF),
    (
        "logistic head (C=0.1), padded, image+mirror features",
        "HEAD = 'logistic' (CPU)",
        "l0_pad_avg",
        "shrink10",
        1,
        OOF,
    ),
    ("  same, plain resize", "PAD = False", "l0_resize_avg", "shrink10", 1, OOF),
    ("  same, image only (no flip)", "TTA (CPU: off)", "l0_pad_plain", "shrink10", 1, OOF),
    (
        "  same, flip TTA (mean of probabilities)",
        "TTA (CPU: off)",
        "l0_pad_tta",
        "shrink10",
        1,
        OOF,
    ),
    ("  Lite1, padded", "CPU recipe backbones", "l1_pad_avg", "shrink10", 1, OOF),
    ("  Lite1, plain resize", "PAD = False", "l1_resize_avg", "shrink10", 1, OOF),
    ("  Lite2, padded", "CPU recipe backbones", "l2_pad_avg", "shrink10", 1, OOF),
    ("  Lite2, plain resize", "PAD = False", "l2_resize_avg", "shrink10", 1, OOF),
    ("  ensemble Lite0+1+2, padded", "PAD = False", "ens_l0l1l2", "shrink10", 1, OOF),
    (
        "  ensemble Lite0+1+2, resized, one global threshold",
        "SHRINK, MIN_POSITIVES",
        "ens_l0l1l2_resize",
        "global",
        1,
        OOF,
    ),
    (
        "  ensemble Lite0+1+2, resized, per-class thresholds (>= 5 positives)",
        "MIN_POSITIVES = 5",
        "ens_l0l1l2_resize",
        "perclass5",
        1,
        OOF,
    ),
    (
        "  ensemble Lite0+1+2, resized, shrunk per-class thresholds",
        "SHRINK = 10",
        "ens_l0l1l2_resize",
        "shrink10",
        1,
        OOF,
    ),
    (
        "  same, image only: the CPU recipe of run.py",
        "CPU recipe (TTA = 0)",
        "ens_l0l1l2_resize_plain",
        "shrink10",
        1,
        OOF,
    ),
    (
        "Lite0 frozen, logistic head",
        "CPU recipe",
        "ft_split_logistic",
        "halves_shrink10",
        1,
        HALVES,
    ),
    (
        "Lite0 frozen, MLP head (notebook phase 1)",
        "EPOCHS_FROZEN",
        "ft_split_frozen_mlp",
        "halves_shrink10",
        1,
        HALVES,
    ),
    (
        "  + 3 fine-tuning epochs, BatchNorm frozen",
        "FREEZE_BN = True",
        "ft_bn_frozen_raw",
        "halves_shrink10",
        1,
        HALVES,
    ),
    (
        "  + 3 fine-tuning epochs, BatchNorm frozen, EMA weights",
        "EMA_EPOCHS = 1",
        "ft_bn_frozen_ema",
        "halves_shrink10",
        1,
        HALVES,
    ),
    (
        "  + 3 fine-tuning epochs, BatchNorm in train mode",
        "FREEZE_BN = True",
        "ft_bn_train_raw",
        "halves_shrink10",
        1,
        HALVES,
    ),
    (
        "  + 3 fine-tuning epochs, BatchNorm in train mode, EMA weights",
        "EMA_EPOCHS = 1",
        "ft_bn_train_ema",
        "halves_shrink10",
        1,
        HALVES,
    ),
]


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dir_argument(ap)
    ap.add_argument("--out", default=str(HERE / "evidence.csv"))
    args = ap.parse_args()
    df = pd.read_csv(work_dir(args.dir) / "results_per_seed.csv")
    df = df.drop_duplicates(["recipe", "rule", "top1", "seed"], keep="last")
    rows = []
    for step, backs, recipe, rule, top1, protocol in STEPS:
        d = df[(df.recipe == recipe) & (df.rule == rule) & (df.top1 == top1)]
        if d.empty:
            print(
                f"warning: no results for {recipe} / {rule} / top1={top1}: step {step!r} left out",
                file=sys.stderr,
            )
            continue
        # ablate.py's column: seconds per outer fold (5 folds a seed); finetune.py's: per seed
        minutes = d.fit_s_per_outer_fold * (1 if protocol == HALVES else 5) / 60
        rows.append(
            {
                "step": "… " + step.strip() if step.startswith("  ") else step,
                "backs": backs,
                "protocol": protocol,
                "seeds": d.seed.nunique(),
                "course F1": d.course_f1.mean(),
                "course F1 sd": d.course_f1.std(),
                "macro F1": d.macro_f1.mean(),
                "macro F1 sd": d.macro_f1.std(),
                "mAP": d.mAP.mean(),
                "minutes per seed": minutes.mean(),
                "recipe": recipe,
                "rule": rule,
                "top1": top1,
            }
        )
    out = pd.DataFrame(rows).round(4)
    out.to_csv(args.out, index=False)
    pd.set_option("display.width", 250)
    print(out.drop(columns=["recipe", "rule", "top1"]).to_string(index=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
