"""notebook_sim21.csv -> how far each estimate the notebook prints is from the hidden-set score.

For the model the notebook picks (best f1_oof_halves) and for each fixed model: the mean over
repetitions of every estimate and of the hidden-set course F1, the mean error (estimate minus
hidden), the RMSE, and the share of repetitions where each model is picked.

    PYTHONPATH=. python research/sim_summary21.py runs/ablation/sim96.csv
"""
import sys

import numpy as np
import pandas as pd

EST = ["f1_per_class", "f1_per_class_heldout", "f1_oof_thresholds", "f1_oof_halves", "exp_course",
       "crossfit_course_full", "exp_course_insample_thr", "exp_nested"]


def summary(d: pd.DataFrame) -> pd.DataFrame:
    rows = {}
    for e in [e for e in EST if e in d] + ["hidden_course"]:
        err = d[e] - d["hidden_course"]
        rows[e] = {"mean": d[e].mean(), "sd": d[e].std(), "mean error vs hidden": err.mean(),
                   "se of mean error": err.std() / np.sqrt(len(d)), "rmse vs hidden": np.sqrt((err ** 2).mean()),
                   "corr with hidden": np.corrcoef(d[e], d["hidden_course"])[0, 1] if e != "hidden_course" else 1.0}
    return pd.DataFrame(rows).T


def main(path):
    df = pd.read_csv(path).drop_duplicates(["rep", "model"], keep="last")
    pd.set_option("display.width", 200)
    n = df.rep.nunique()
    print(f"{path}: {n} repetitions; train {df.n_train.mean():.0f}, validation {df.n_val.mean():.1f}, "
          f"hidden {df.n_hidden.iloc[0]} photos")
    print("picks:", df[df.chosen == 1].model.value_counts().to_dict())
    for label, d in [("the picked model (what the notebook submits and prints)", df[df.chosen == 1])] + \
            [(f"always {m}", df[df.model == m]) for m in ("ens", "l0", "l1", "l2")]:
        print(f"\n== {label}")
        print(summary(d).round(4).to_string())
    chosen = df[df.chosen == 1].set_index("rep")
    ens = df[df.model == "ens"].set_index("rep")
    best_sel = df.groupby("rep").f1_oof_halves.max()
    print("\nselection: printed max f1_oof_halves {:.4f} vs the ensemble's f1_oof_halves {:.4f}; hidden score of the "
          "pick {:.4f} vs of the ensemble {:.4f} (paired diff {:.4f} +- {:.4f} se)".format(
              best_sel.mean(), ens.f1_oof_halves.mean(), chosen.hidden_course.mean(), ens.hidden_course.mean(),
              (chosen.hidden_course - ens.hidden_course).mean(),
              (chosen.hidden_course - ens.hidden_course).std() / np.sqrt(n)))
    print("hidden macro F1 {:.4f}, micro F1 {:.4f}, mAP {:.4f} (ensemble)".format(
        ens.hidden_macro.mean(), ens.hidden_micro.mean(), ens.hidden_mAP.mean()))


if __name__ == "__main__":
    main(sys.argv[1])
