"""Frozen head against fine-tuning (BatchNorm frozen or not), raw weights against their EMA.

Why: whether phase 2 of the notebook pays, and with which BatchNorm setting and which weights,
cannot be read off the cached-feature ablation (ablate.py): the backbone has to learn. This runs
the notebook's own pieces (``h.train_loop``/``h.validation_loop``, ``models.param_groups``,
``training.warmup_cosine``, ``training.make_ema``) on the real photos, on a CPU, per seed:

  split      stratified 80/20 of the labelled photos (``split.stratified_split``, seeded)
  phase 1    EfficientNet-Lite0 at 224 px, padded; the notebook's MLP head trained on cached
             features (AdamW, LR_HEAD, EPOCHS_FROZEN epochs, warm-up cosine); also, on the same
             features, the logistic-regression head of the CPU recipe
  phase 2    from the same phase-1 state, once with BatchNorm frozen and once in train mode:
             --epochs epochs, AdamW with the backbone at 0.1x, one-epoch warm-up then cosine,
             TrivialAugment, batch --batch; a moving average of the weights (EMA_EPOCHS = 1)
             updated after every step
  scores     the last epoch's raw weights and their EMA on the validation split: mAP, and the
             course/macro F1 of thresholds tuned on one random half of the validation split and
             scored on the other (shrunk per-class thresholds, k=10; 10 repeats x both halves)

Rows are appended to ``<dir>/results_per_seed.csv`` in ablate.py's columns (rule
``halves_shrink10``), so summarise.py averages them with the rest; ``fit_s_per_outer_fold``
holds this variant's seconds for the seed.
"""

import argparse
import copy
import time

import numpy as np
import torch
from common import DEFAULT_DATA, ResultsCSV, add_dir_argument, loadavg, work_dir
from sklearn.metrics import f1_score

import cpu_recipe
import helpers as h
from cocochallenge import config, data, models, split, training, transforms
from cocochallenge import metrics as cm

NB = {
    "lr_head": 1e-3,
    "epochs_frozen": 6,
    "lr_finetune": 3e-4,
    "backbone_lr_factor": 0.1,
    "weight_decay": 1e-4,
    "ema_epochs": 1.0,
    "dropout": 0.2,
    "logistic_c": 0.1,
}


def halves_scores(y, probs, repeats=10, seed=0):
    """Course and macro F1 of shrunk thresholds tuned on one half and scored on the other."""
    y = y.astype(bool)
    course, macro = [], []
    for tune, score in cm.random_halves(len(y), repeats, seed):  # the halves of repeated_halves_f1
        t = cm.shrunk_thresholds(y[tune], probs[tune], 10.0)
        pred = cm.apply_thresholds(probs[score], t, at_least_one=True)
        course.append(cm.course_f1(y[score], pred)["f1"])
        macro.append(f1_score(y[score], pred, average="macro", zero_division=0))
    return float(np.mean(course)), float(np.mean(macro))


def validate(net, loader, crit):
    res = h.validation_loop(
        loader,
        net,
        crit,
        config.NUM_CLASSES,
        "cpu",
        multi_label=True,
        th_multi_label=0.0,
        one_hot=True,
        keep_probs=True,
    )
    return res["probs"]


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    add_dir_argument(ap)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0, help="first N photos only (a smoke test)")
    ap.add_argument("--variants", default="bn_frozen,bn_train")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    print(config.keep_freed_memory(), flush=True)
    out = work_dir(args.dir)
    args.out = args.out or str(out / "results_per_seed.csv")
    paths = data.data_paths(args.data)
    ds = h.COCOTrainImageDataset(paths["train_images"], paths["train_labels"])
    n = args.limit or len(ds)
    Y = data.labels_of(ds)[:n].astype(np.float32)
    pre = models.preprocess_for("efficientnet_lite0")
    eval_t = transforms.build_transform(pre, train=False, pad=True)
    train_t = transforms.build_transform(pre, train=True, pad=True, augment="trivial")
    crit = torch.nn.BCEWithLogitsLoss()
    results = ResultsCSV(args.out)

    def write(recipe, seed, yv, probs, seconds):
        course, macro = halves_scores(yv, probs, seed=seed)
        row = {
            "recipe": recipe,
            "rule": "halves_shrink10",
            "top1": 1,
            "seed": seed,
            "course_f1": course,
            "macro_f1": macro,
            "micro_f1": float("nan"),
            "mAP": cm.mean_average_precision(yv.astype(bool), probs),
            "labels_per_img": float("nan"),
            "course_f1_foldmean": course,
            "fit_s_per_outer_fold": round(seconds, 1),
            "loadavg": loadavg(),
            "members": f"lite0_224_pad finetune.py epochs={args.epochs} batch={args.batch}",
            "ens": "-",
        }
        results.write(row)
        print(
            f"{recipe:24} seed {seed}: course F1 {course:.4f}  macro {macro:.4f}  "
            f"mAP {row['mAP']:.4f}  {seconds:.0f}s",
            flush=True,
        )

    for seed in [int(s) for s in args.seeds.split(",")]:
        tr, va = split.stratified_split(Y, 0.2, seed)
        yt, yv = Y[tr], Y[va]
        loader = lambda idx, tf, train: transforms.make_loader(
            data.LabelledSubset(ds, idx, tf), args.batch, train
        )  # noqa: E731
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        model, _ = models.build_model(
            "efficientnet_lite0", head="mlp", dropout=NB["dropout"], prior=yt.mean(0)
        )
        models.freeze_backbone(model)
        ft = training.extract_features(
            model.backbone, loader(tr, eval_t, False), "cpu", show_progress=False
        )
        fv = training.extract_features(
            model.backbone, loader(va, eval_t, False), "cpu", show_progress=False
        )
        t_feats = time.perf_counter() - t0
        # the CPU recipe's head on the same split
        t1 = time.perf_counter()
        lin = cpu_recipe.fit_logistic(ft, yt, C=NB["logistic_c"])
        probs = validate(lin, training.feature_loader(fv, yv, 4096, False), crit)
        write("ft_split_logistic", seed, yv, probs, t_feats + time.perf_counter() - t1)
        # the notebook's frozen phase: MLP head on cached features
        t1 = time.perf_counter()
        fl = training.feature_loader(ft, yt, 64, shuffle=True)
        opt = torch.optim.AdamW(
            model.head.parameters(), lr=NB["lr_head"], weight_decay=NB["weight_decay"]
        )
        sched = training.warmup_cosine(opt, len(fl) * NB["epochs_frozen"])
        for _epoch in range(NB["epochs_frozen"]):
            h.train_loop(fl, model.head, crit, opt, "cpu", scheduler=sched)
        probs = validate(model.head, training.feature_loader(fv, yv, 4096, False), crit)
        t_frozen = t_feats + time.perf_counter() - t1
        write("ft_split_frozen_mlp", seed, yv, probs, t_frozen)
        start = copy.deepcopy(model.state_dict())
        for variant in args.variants.split(","):
            t1 = time.perf_counter()
            model.load_state_dict(start)
            models.unfreeze_backbone(model)
            model.freeze_bn = variant == "bn_frozen"
            train_loader = loader(tr, train_t, True)
            groups = models.param_groups(
                model, NB["lr_finetune"], NB["backbone_lr_factor"], NB["weight_decay"]
            )
            opt = training.make_optimizer(groups, torch.device("cpu"), NB["lr_finetune"])
            total = len(train_loader) * args.epochs
            sched = training.warmup_cosine(
                opt, total, warmup_steps=min(len(train_loader), total // 5)
            )
            ema = training.make_ema(model, len(train_loader), NB["ema_epochs"])
            for epoch in range(args.epochs):
                torch.manual_seed(seed * 100 + epoch)
                res = h.train_loop(train_loader, model, crit, opt, "cpu", scheduler=sched, ema=ema)
                print(
                    f"  {variant} epoch {epoch + 1}/{args.epochs}: loss {res['loss']:.4f} "
                    f"{time.perf_counter() - t1:.0f}s",
                    flush=True,
                )
            val_loader = loader(va, eval_t, False)
            seconds = t_frozen + time.perf_counter() - t1
            write(f"ft_{variant}_raw", seed, yv, validate(model, val_loader, crit), seconds)
            write(f"ft_{variant}_ema", seed, yv, validate(ema.module, val_loader, crit), seconds)
            del ema, opt, train_loader
    results.close()


if __name__ == "__main__":
    main()
