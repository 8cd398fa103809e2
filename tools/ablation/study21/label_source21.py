"""Task 1c of REPORT21.md: do the held-out scores differ between photos with complete and with fallback labels?

Why: 189 of the 678 photos carry labels from a public image-level list that misses small or
occluded objects (the data README); a hidden test set labelled from the full COCO instance
annotations would then hold more hard small-object labels than the photos the estimates were
measured on. From eval21.py's pooled held-out predictions of one recipe, this scores the
``gold`` photos (instance annotations: the 96 of real-coco-dev and 393 others) and the
``fallback`` ones separately, as random subsets of the same size (the course F1 depends on the
set size), and also the labels per photo of each group.

    PYTHONPATH=. python research/label_source21.py --recipe base
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools" / "ablation"), str(REPO), str(REPO / "research")]

from common import DEFAULT_DATA, add_dir_argument, work_dir  # noqa: E402
from eval21 import subset_scores  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dir_argument(ap)
    ap.add_argument("--recipe", default="base")
    ap.add_argument("--rule", default="shrink10")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--size", type=int, default=150)
    ap.add_argument("--draws", type=int, default=3000)
    args = ap.parse_args()
    out = work_dir(args.dir)
    Y = np.load(out / "feats" / "labels.npy").astype(bool)
    stems = (out / "feats" / "stems.txt").read_text().split()[: len(Y)]
    prov = {d["id"]: d["label_source"] for d in json.loads((DEFAULT_DATA.parent / "provenance.json").read_text())}
    source = np.array([prov.get(s, "gold") for s in stems])        # the 96 dev photos: instance annotations
    print({k: int((source == k).sum()) for k in ("gold", "fallback")})
    for group in ("gold", "fallback"):
        rows = np.flatnonzero(source == group)
        print(f"{group}: {len(rows)} photos, {Y[rows].sum(1).mean():.2f} labels per photo")
    res = {}
    for s in [int(x) for x in args.seeds.split(",")]:
        pred = np.load(out / "pooled" / f"{args.recipe}_{args.rule}_s{s}.npz")["pred"]
        for group in ("gold", "fallback"):
            rows = np.flatnonzero(source == group)
            rng = np.random.default_rng([s, len(rows)])
            D = np.zeros((args.draws, len(Y)))
            for i in range(args.draws):
                D[i, rng.choice(rows, args.size, replace=False)] = 1
            c, ma, mi = subset_scores(Y, pred, D)
            full = subset_scores(Y, pred, (source == group)[None, :].astype(float))
            for k, v in {"course@n": c.mean(), "macro@n": ma.mean(), "micro@n": mi.mean(),
                         "course_all": full[0][0], "micro_all": full[2][0]}.items():
                res.setdefault((group, k), []).append(v)
    for (group, k), v in res.items():
        print(f"{group:9s} {k:11s} {np.mean(v):.4f} (seeds sd {np.std(v, ddof=1):.4f})")


if __name__ == "__main__":
    main()
