"""Extract pooled features of the 678 labelled + 32 test photos once per variant.

Why: every head/threshold recipe of ablate.py is then a few seconds of fitting on cached
features instead of minutes of backbone inference on a shared CPU.

A variant = backbone x input size x geometry (pad-to-square | plain resize) x normalisation,
saved for the image and for its mirror:  <dir>/feats/<bb>_<size>_<geom>_<norm>_<plain|flip>.npy
(rows: the train stems in sorted order, then the test stems), with <dir>/feats/labels.npy and
stems.txt. Timings go to <dir>/extract_times.csv. ``--limit N`` keeps only the first N rows
(a smoke test of the pipeline, not features to ablate on).
"""

import argparse
import csv
import time

import numpy as np
import torch
from common import (
    DEFAULT_DATA,
    NATIVE,
    add_dir_argument,
    build_backbone,
    loadavg,
    test_listing,
    train_listing,
    work_dir,
)

from cocochallenge import config, data, models, transforms

NORMS = {
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": (
        models.preprocess_for("resnet50")["mean"],
        models.preprocess_for("resnet50")["std"],
    ),
}


def transform(size, geom, norm):
    """Evaluation transform: aspect kept and padded (colour: the mean) or plain resize."""
    mean, std = NORMS[norm]
    return transforms.build_transform(
        {"size": size, "mean": mean, "std": std}, train=False, pad=geom == "pad"
    )


@torch.inference_mode()
def run(backbone, images, tf, batch=32):
    out_plain, out_flip = [], []
    for i in range(0, len(images), batch):
        x = torch.stack([tf(im) for im in images[i : i + batch]])
        xx = torch.cat([x, x.flip(3)])
        f = backbone(xx).float().numpy()
        out_plain.append(f[: len(x)])
        out_flip.append(f[len(x) :])
    return np.concatenate(out_plain), np.concatenate(out_flip)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--data", default=str(DEFAULT_DATA), help="challenge data root (default: %(default)s)"
    )
    add_dir_argument(ap)
    ap.add_argument("--backbones", default="lite0,lite1,lite2")
    ap.add_argument("--sizes", default="native", help="comma list of ints or 'native'")
    ap.add_argument("--geoms", default="pad")
    ap.add_argument("--norms", default="half")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--limit", type=int, default=0, help="only the first N rows (train first, then test)"
    )
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    print(config.keep_freed_memory(), flush=True)
    torch.set_num_threads(args.threads)
    out = work_dir(args.dir)
    feats = out / "feats"
    feats.mkdir(exist_ok=True)
    stems, Y, paths = train_listing(args.data)
    tstems, tpaths = test_listing(args.data)
    all_stems, all_paths = stems + tstems, list(paths) + list(tpaths)
    if args.limit:
        all_stems, all_paths, Y = all_stems[: args.limit], all_paths[: args.limit], Y[: args.limit]
    np.save(feats / "labels.npy", Y)
    (feats / "stems.txt").write_text("\n".join(all_stems) + "\n")
    t0 = time.perf_counter()
    images = [data.load_rgb(p) for p in all_paths]
    t_load = time.perf_counter() - t0
    log = out / "extract_times.csv"
    new = not log.exists()
    with open(log, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(
                [
                    "backbone",
                    "size",
                    "geom",
                    "norm",
                    "n_images",
                    "views",
                    "seconds",
                    "load_seconds",
                    "loadavg_before",
                    "loadavg_after",
                    "threads",
                ]
            )
        for bb in args.backbones.split(","):
            model = build_backbone(bb)
            for s in args.sizes.split(","):
                size = NATIVE[bb] if s == "native" else int(s)
                for geom in args.geoms.split(","):
                    for norm in args.norms.split(","):
                        stem = f"{bb}_{size}_{geom}_{norm}"
                        if (feats / f"{stem}_flip.npy").exists() and not args.force:
                            print("skip", stem)
                            continue
                        la = loadavg()
                        t = time.perf_counter()
                        fp, ff = run(model, images, transform(size, geom, norm))
                        dt = time.perf_counter() - t
                        np.save(feats / f"{stem}_plain.npy", fp.astype(np.float32))
                        np.save(feats / f"{stem}_flip.npy", ff.astype(np.float32))
                        w.writerow(
                            [
                                bb,
                                size,
                                geom,
                                norm,
                                len(images),
                                2,
                                round(dt, 1),
                                round(t_load, 1),
                                la,
                                loadavg(),
                                args.threads,
                            ]
                        )
                        fh.flush()
                        print(
                            f"{stem}: {dt:.1f}s (2 views, {len(images)} images) load {la}",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
