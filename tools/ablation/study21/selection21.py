"""Selection bias of "pick the best model on the scores you report", measured under nested CV.

Why: the notebook picks the best of {Lite0, Lite1, Lite2, ensemble} by ``f1_oof_halves`` (course
F1 of thresholds tuned on one random half of the training images' out-of-fold scores and scored
on the other half, 10 partitions x both ways) and prints that maximum. Here, in every outer fold
of eval21.py's CV (the same cached member probabilities), the selection score of each candidate
is computed on the outer training part only (its inner out-of-fold scores, exactly
``metrics.repeated_halves_f1``), the best is picked, and the picked candidate is scored on the
held-out outer fold with thresholds from the inner out-of-fold scores (shrunk, k=10, top class).

Per (seed, fold) row: every candidate's selection score (``sel_<c>``) and held-out fold score
(``out_<c>``), the pick, and the pooled course F1 of the selection procedure per seed (each
fold predicted by its own pick) beside each fixed candidate's.

    PYTHONPATH=. python research/selection21.py --recipes research/recipes21.txt \
        --candidates l0_224,l1_240,l2_260,base --seeds 0,1,2
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools" / "ablation"), str(REPO), str(REPO / "research")]

import ablate  # noqa: E402
from common import add_dir_argument, work_dir  # noqa: E402
from cocochallenge import metrics as cm  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dir_argument(ap)
    ap.add_argument("--recipes", required=True)
    ap.add_argument("--candidates", required=True, help="comma list of recipe names")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--tag", default="sel")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import pandas as pd
    out = work_dir(args.dir)
    feats, probs = out / "feats", out / "probs"
    Y = np.load(feats / "labels.npy").astype(np.int64)
    seeds = [int(s) for s in args.seeds.split(",")]
    folds, inner = ablate.make_folds(Y, seeds, args.folds, args.inner)
    cands = args.candidates.split(",")
    recipes = {n: (m, e) for n, m, e in ablate.read_recipes(args.recipes, args.candidates)}
    rows, pooled = [], []
    for s in seeds:
        vo = {}
        for c in cands:
            members, ens = recipes[c]
            kind = ablate.recipe_kind(c, members)
            outs = [ablate.member_probs(m, s, folds[kind][s], Y, inner[kind], feats, probs) for m in members]
            vo[c] = ablate.ensemble(outs, ens)
        preds = {c: np.zeros_like(Y, dtype=bool) for c in cands + ["selected"]}
        for k, (tr, te) in enumerate(folds["strat"][s]):
            row = {"seed": s, "fold": k}
            for c in cands:
                val, oof = vo[c]
                row[f"sel_{c}"] = cm.repeated_halves_f1(Y[tr], oof[k, tr], 10.0, at_least_one=True)[0]
                t = cm.shrunk_thresholds(Y[tr], oof[k, tr], 10.0)
                preds[c][te] = cm.apply_thresholds(val[te], t, at_least_one=True)
                row[f"out_{c}"] = cm.course_f1(Y[te], preds[c][te])["f1"]
            pick = max(cands, key=lambda c: row[f"sel_{c}"])
            preds["selected"][te] = preds[pick][te]
            row.update(pick=pick, sel_max=row[f"sel_{pick}"], out_picked=row[f"out_{pick}"])
            rows.append(row)
        pooled.append({"seed": s, **{c: cm.course_f1(Y, preds[c])["f1"] for c in preds}})
        print(pd.DataFrame(rows[-args.folds:]).round(3).to_string(index=False), flush=True)
    df, pf = pd.DataFrame(rows), pd.DataFrame(pooled)
    df.to_csv(out / f"selection21_{args.tag}_folds.csv", index=False)
    pf.to_csv(out / f"selection21_{args.tag}_pooled.csv", index=False)
    print("\nper (seed, fold), mean over", len(df), "folds:")
    summ = {"selection score of the pick (printed max)": df.sel_max.mean(),
            "held-out fold score of the pick": df.out_picked.mean()}
    for c in cands:
        summ[f"selection score of {c}"] = df[f"sel_{c}"].mean()
        summ[f"held-out fold score of {c}"] = df[f"out_{c}"].mean()
    print(pd.Series(summ).round(4).to_string())
    print("picks:", df.pick.value_counts().to_dict())
    print("\npooled held-out course F1 (678 images) per seed:\n" + pf.round(4).to_string(index=False))
    print(pf.drop(columns="seed").agg(["mean", "std"]).round(4).to_string())


if __name__ == "__main__":
    main()
