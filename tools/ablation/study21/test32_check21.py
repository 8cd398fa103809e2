"""The 32 test photos with answers (real-coco-dev): recipes trained as the run trains them, scored once.

Why: a final check of recipes on photos outside the 678, as the data README asks (32 photos are
far too few to rank recipes: a course F1 on 32 photos has an sd of about 0.07, REPORT21.md).
Per member: ``training.fit_logistic`` (C of the member) on all 678 labelled photos, thresholds
shrunk (k=10) on the ensemble's ``training.out_of_fold_probs`` (5 folds), top class added, from
the cached features (rows 678.. of ``feats/*_plain.npy`` are the test photos).

    PYTHONPATH=. python research/test32_check21.py --recipes research/recipes21_final.txt
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools" / "ablation"), str(REPO), str(REPO / "research")]

import ablate  # noqa: E402
from common import DEFAULT_DATA, add_dir_argument, work_dir  # noqa: E402
from cocochallenge import metrics as cm, training  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dir_argument(ap)
    ap.add_argument("--recipes", required=True)
    ap.add_argument("--only", default="")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = work_dir(args.dir)
    feats = out / "feats"
    Y = np.load(feats / "labels.npy").astype(np.int64)
    stems = (feats / "stems.txt").read_text().split()
    answers = json.loads((DEFAULT_DATA.parent / "test_labels.json").read_text())
    tstems = stems[len(Y):]
    Yt = np.zeros((len(tstems), Y.shape[1]), dtype=bool)
    for i, s in enumerate(tstems):
        Yt[i, answers[s]] = True
    for name, members, ens in ablate.read_recipes(args.recipes, args.only):
        tests, oofs = [], []
        for spec in members:
            p = ablate.member_settings(spec)
            plain, flip = ablate.load_views(feats, p["feat"], p["ms"])
            X = torch.as_tensor((plain + flip) / 2 if p["view"] == "avg" else plain)
            layer = training.fit_logistic(X[: len(Y)], Y, C=float(p["C"]))
            oofs.append(training.out_of_fold_probs(X[: len(Y)], Y, C=float(p["C"])))
            with torch.no_grad():
                tests.append(torch.sigmoid(layer(X[len(Y):])).numpy())
        test, oof = ablate.ensemble(list(zip(tests, oofs)), ens)
        t = cm.shrunk_thresholds(Y, oof, 10.0)
        m = cm.evaluate_predictions(Yt, test, t, at_least_one=True)
        print(f"{name:28s} 32 test photos: course F1 {m['course_f1']:.4f}  macro {m['macro_f1']:.4f}  "
              f"micro {m['micro_f1']:.4f}  mAP {m['mAP']:.4f}", flush=True)


if __name__ == "__main__":
    main()
