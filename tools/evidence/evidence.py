"""The evidence behind the notebook's fixed settings: one paired comparison per setting.

    python tools/evidence/evidence.py           # writes tools/evidence/evidence.csv (README.md)

The settings a run does not choose in sight on its own validation images (``config.OPTIONS``
and the parameters cell) are each compared with their alternative on the labelled real COCO
photos, every score held out:

  folds     repeated 5-fold cross-validation, multi-label stratified (seed = the repeat); each
            fold's photos play the test set, scored by a model that never saw them
  phase 1   on the other four folds, the notebook's frozen phase: its 80/20 split
            (``split.stratified_split``), the course's MLP head on cached EfficientNet-Lite0
            features, output bias at the class log-odds, AdamW, warm-up cosine, the epoch kept
            by validation mAP (patience 5), as challenge.ipynb's ``train_head``/``run_phase``
  phase 2   (``freeze_bn`` only: the first fold of the first repeat, for time) the notebook's
            fine-tuning from that head, 3 epochs, the better of the raw weights and their moving
            average kept each epoch by validation mAP
  score     the held-out course F1 of the pooled out-of-fold probabilities of the photos scored
            (``compare.cross_fitted``: thresholds tuned on one random half, scored on the other)
  interval  90%: the difference (mean over repeats) plus or minus 1.645 standard errors, the
            squared standard error being the variance of a paired bootstrap over the photos
            plus the variance of the per-repeat differences divided by the number of repeats

Features and each fold's probabilities are cached under ``--dir`` (git-ignored), keyed by what
they depend on, so an interrupted run goes on where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import helpers as h
from cocochallenge import (
    analysis,
    checkpoints,
    compare,
    config,
    data,
    files,
    metrics,
    models,
    split,
    training,
    transforms,
)

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BACKBONE = "efficientnet_lite0"
#: The committed real-photo run's parameters (README, "The committed outputs"), the notebook's
#: defaults otherwise.
NB = dict(epochs_frozen=30, batch_size=32, lr_head=1e-3, val_fraction=0.2, patience=5,
          dropout=0.2, weight_decay=1e-4, epochs_finetune=3, lr_finetune=3e-4,
          backbone_lr_factor=0.1, ema_epochs=1.0, augment="trivial")  # fmt: skip
#: The variants trained: the notebook's own and one change each (phase 2: ``freeze_bn``).
ARMS = {
    "notebook": dict(pad=False, loss="bce", prior=True),
    "pad": dict(pad=True, loss="bce", prior=True),
    "asl": dict(pad=False, loss="asl", prior=True),
    "zero bias": dict(pad=False, loss="bce", prior=False),
    "freeze_bn": dict(pad=False, loss="bce", prior=True, finetune=True, freeze_bn=True),
    "bn train": dict(pad=False, loss="bce", prior=True, finetune=True, freeze_bn=False),
}
#: The notebook's rule: per-class thresholds shrunk by 10 positives, every image its top class.
RULE = dict(shrink=10.0, at_least_one=True)
#: (setting, against, (arm, rule) of the setting, (arm, rule) of the alternative)
ROWS = [
    ("pad = False", "pad = True (aspect kept, padded to a square)",
     ("notebook", RULE), ("pad", RULE)),
    ('LOSS = "bce"', 'LOSS = "asl"', ("notebook", RULE), ("asl", RULE)),
    ("shrink = 10", "one threshold for every class", ("notebook", RULE),
     ("notebook", dict(RULE, shrink=analysis.ONE_THRESHOLD))),
    ("shrink = 10", "shrink = 0 (per-class thresholds as tuned)", ("notebook", RULE),
     ("notebook", dict(RULE, shrink=0.0))),
    ("at_least_one = True", "at_least_one = False", ("notebook", RULE),
     ("notebook", dict(RULE, at_least_one=False))),
    ("freeze_bn = True", "freeze_bn = False (BatchNorm in train mode)", ("freeze_bn", RULE),
     ("bn train", RULE)),
    ("output bias at the class log-odds", "output bias at zero", ("notebook", RULE),
     ("zero bias", RULE)),
]  # fmt: skip


def criterion(loss: str) -> nn.Module:
    """The notebook's loss (challenge.ipynb, section 4)."""
    if loss == "bce":
        return nn.BCEWithLogitsLoss()
    from timm.loss import AsymmetricLossMultiLabel

    return AsymmetricLossMultiLabel(gamma_pos=0, clip=0.05, reduction="batchmean")


def paired(y: np.ndarray, runs_a: list, runs_b: list, n_boot: int = 1000, seed: int = 0) -> dict:
    """Setting ``a`` minus ``b`` in held-out course F1, with its 90% interval.

    ``runs_a``/``runs_b``: one list of binary prediction matrices per repeat (the same repeats,
    the same images ``y``). The difference is the mean over repeats; its variance is that of
    a paired bootstrap over the images (the same resamples for both settings and every
    repeat: which photos) plus the variance of the per-repeat differences over their number
    (which folds and seeds; absent with one repeat).
    """
    W = compare.resamples(len(y), n_boot, seed)
    full = np.ones((1, len(y)), dtype=np.float32)
    f1 = lambda preds, w: compare.scores(y, preds, None, w)["course F1"]  # noqa: E731
    a = np.array([f1(p, full)[0] for p in runs_a])
    b = np.array([f1(p, full)[0] for p in runs_b])
    boot = np.mean([f1(pa, W) - f1(pb, W) for pa, pb in zip(runs_a, runs_b)], 0)
    var = np.var(boot) + (np.var(a - b, ddof=1) / len(a) if len(a) > 1 else 0.0)
    diff, half = float(np.mean(a - b)), compare.Z * float(np.sqrt(var))
    return {"difference": diff, "lo": diff - half, "hi": diff + half,
            "a": float(a.mean()), "b": float(b.mean()), "per repeat": a - b}  # fmt: skip


class Evidence:
    """The photos, their cached features, and each arm's out-of-fold probabilities per repeat."""

    def __init__(self, root: Path, work: Path, limit: int = 0, folds: int = 5, log=print):
        paths = data.data_paths(root)
        self.dataset = h.COCOTrainImageDataset(paths["train_images"], paths["train_labels"])
        self.Y = data.labels_of(self.dataset).astype(np.float32)
        self.images = np.arange(limit or len(self.Y))
        self.Y = self.Y[self.images]
        self.work, self.folds, self.log = work, folds, log
        self.photos = data.digest(data.inventory(self.dataset, data.labels_of(self.dataset)))
        self.pre = models.preprocess_for(BACKBONE)
        self.device = torch.device("cpu")
        self._feats = {}

    def features(self, pad: bool) -> torch.Tensor:
        """Lite0's pooled features of every photo (one view), computed once and cached."""
        if pad not in self._feats:
            backbone = models.build_model(BACKBONE)[0].backbone
            tf = transforms.build_transform(self.pre, train=False, pad=pad)
            loader = transforms.make_loader(self.subset(self.images, tf), 64, False, "cpu", 0)
            t0 = time.perf_counter()
            key = {"backbone": BACKBONE, **self.pre, "pad": pad, "images": self.photos,
                   "limit": len(self.images)}  # fmt: skip
            path = self.work / f"features_{'pad' if pad else 'resize'}.pt"
            feats = training.cached_features(path, backbone, loader, self.device, key=key,
                                             show_progress=False)  # fmt: skip
            self.log(f"features (pad={pad}): {time.perf_counter() - t0:.0f} s")
            self._feats[pad] = feats
        return self._feats[pad]

    def subset(self, idx, tf):
        return data.LabelledSubset(self.dataset, self.images[idx], tf)

    def splits(self, repeat: int):
        """``(train, inner train, inner validation, test)`` indices of each fold of a repeat."""
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

        kfold = MultilabelStratifiedKFold(self.folds, shuffle=True, random_state=repeat)
        for train, test in kfold.split(np.zeros(len(self.Y)), self.Y):
            inner, val = split.stratified_split(self.Y[train], NB["val_fraction"], repeat)
            yield train, train[inner], train[val], test

    def probs(self, arm: str, repeat: int, folds: int = 0) -> np.ndarray:
        """Out-of-fold probabilities of one arm and repeat, cached per fold; with ``folds``,
        of the first ``folds`` folds only (NaN for the photos of the others)."""
        out = np.full(self.Y.shape, np.nan, dtype=np.float32)
        for fold, (_, train, val, test) in enumerate(self.splits(repeat)):
            if folds and fold >= folds:
                break
            key = dict(arm=ARMS[arm], nb=NB, repeat=repeat, fold=fold, folds=self.folds,
                       images=self.photos, limit=len(self.images))  # fmt: skip
            path = self.work / "folds" / f"{arm.replace(' ', '_')}_r{repeat}_f{fold}.pt"
            saved = files.load_torch(path) if path.exists() else None
            if saved is None or json.loads(saved["key"]) != json.loads(json.dumps(key)):
                t0 = time.perf_counter()
                saved = self.fit(arm, repeat, fold, train, val, test)
                saved["key"] = json.dumps(key)
                files.torch_save_atomic(saved, path)
                self.log(f"{arm}, repeat {repeat}, fold {fold}: epoch {saved['epoch']}, "
                         f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
            out[test] = saved["probs"].numpy()
        return out

    def fit(self, arm: str, repeat: int, fold: int, train, val, test) -> dict:
        """One fold of one arm: phase 1 (and phase 2), then the test fold's probabilities."""
        s = ARMS[arm]
        if s.get("finetune"):  # from the notebook arm's phase-1 head of the same fold
            self.probs("notebook", repeat, fold + 1)
            start = self.work / "folds" / f"notebook_r{repeat}_f{fold}.pt"
            return self.fine_tune(files.load_torch(start)["head"], s["freeze_bn"], repeat,
                                  train, val, test)  # fmt: skip
        feats = self.features(s["pad"])
        config.seed_everything(repeat)
        net = models.MultiLabelNet(nn.Identity(), models.make_head(feats.shape[1],
                                   dropout=NB["dropout"]))  # fmt: skip
        if s["prior"]:
            models.init_head_bias(net, self.Y[train].mean(0))
        loader = training.feature_loader(feats[train], self.Y[train], NB["batch_size"], True)
        opt = torch.optim.AdamW(net.head.parameters(), lr=NB["lr_head"],
                                weight_decay=NB["weight_decay"])  # fmt: skip
        sched = training.warmup_cosine(opt, len(loader) * NB["epochs_frozen"])
        crit, best, best_epoch, kept = criterion(s["loss"]), -np.inf, 0, None
        for epoch in range(NB["epochs_frozen"]):
            if epoch - best_epoch >= NB["patience"]:
                break
            checkpoints.seed_epoch(repeat, epoch)
            h.train_loop(loader, net, crit, opt, self.device, scheduler=sched)
            score = metrics.mean_average_precision(self.Y[val], self._head_probs(net, feats[val]))
            if score > best:
                best, best_epoch, kept = score, epoch + 1, copy.deepcopy(net.head.state_dict())
        net.head.load_state_dict(kept)
        probs = torch.as_tensor(self._head_probs(net, feats[test]))
        return {"probs": probs, "head": kept, "epoch": best_epoch}

    @staticmethod
    def _head_probs(net, feats) -> np.ndarray:
        net.eval()
        with torch.no_grad():
            return torch.sigmoid(net(feats.float())).numpy()

    def fine_tune(self, head: dict, freeze_bn: bool, repeat: int, train, val, test) -> dict:
        """The notebook's phase 2 (challenge.ipynb ``fine_tune``/``run_phase``) from ``head``."""
        config.seed_everything(repeat)
        model = models.build_model(BACKBONE, dropout=NB["dropout"])[0]
        model.head.load_state_dict(head)
        models.unfreeze_backbone(model)
        model.freeze_bn = freeze_bn

        def loader(idx, train_: bool):
            tf = transforms.build_transform(self.pre, train=train_, augment=NB["augment"])
            batch = NB["batch_size"] * (1 if train_ else 2)
            return transforms.make_loader(self.subset(idx, tf), batch, train_, "cpu", 0)

        def probs(net, idx) -> np.ndarray:
            return training.predict(net, loader(idx, False), self.device, show_progress=False)[
                "probs"
            ]

        train_loader = loader(train, True)
        steps = len(train_loader)
        groups = models.param_groups(
            model, NB["lr_finetune"], NB["backbone_lr_factor"], NB["weight_decay"]
        )
        opt = training.make_optimizer(groups, self.device, NB["lr_finetune"])
        total = steps * NB["epochs_finetune"]
        sched = training.warmup_cosine(opt, total, warmup_steps=min(steps, total // 5))
        ema = training.make_ema(model, steps, NB["ema_epochs"])
        best, best_epoch, kept = -np.inf, 0, None
        for epoch in range(NB["epochs_finetune"]):
            checkpoints.seed_epoch(repeat, epoch)
            h.train_loop(
                train_loader, model, nn.BCEWithLogitsLoss(), opt, self.device,
                scheduler=sched, ema=ema,
            )  # fmt: skip
            for net in (model, ema.module):  # the better of the two, as run_phase keeps it
                score = metrics.mean_average_precision(self.Y[val], probs(net, val))
                if score > best:
                    best, best_epoch, kept = score, epoch + 1, copy.deepcopy(net.state_dict())
        model.load_state_dict(kept)
        return {"probs": torch.as_tensor(probs(model, test)), "epoch": best_epoch}


def row(ev: Evidence, spec: tuple, repeats: int, finetune_folds: int) -> dict | None:
    """One row of the table: the setting against its alternative, paired, with its interval."""
    setting, against, (arm_a, rule_a), (arm_b, rule_b) = spec
    finetune = ARMS[arm_a].get("finetune", False)
    if finetune and not finetune_folds:
        return None
    folds, repeats = (finetune_folds, 1) if finetune else (0, repeats)
    pairs = [(ev.probs(arm_a, r, folds), ev.probs(arm_b, r, folds)) for r in range(repeats)]
    scored = ~np.isnan(pairs[0][0][:, 0])  # the photos of the folds run
    y = ev.Y[scored].astype(bool)

    def held(p, rule):
        return compare.cross_fitted(y, p[scored], rule["shrink"], rule["at_least_one"])

    d = paired(y, [held(a, rule_a) for a, _ in pairs], [held(b, rule_b) for _, b in pairs])
    each = ", ".join(f"{x:+.3f}" for x in d["per repeat"])
    print(f"{setting} against {against}: {d['difference']:+.3f} [{d['lo']:+.3f}, "
          f"{d['hi']:+.3f}]; per repeat {each}", flush=True)  # fmt: skip
    if finetune:
        protocol = f"{folds} of {ev.folds} folds, {NB['epochs_finetune']} fine-tuning epochs"
    else:
        protocol = f"{ev.folds}-fold CV x {repeats}, frozen head"
    return {
        "setting": setting,
        "against": against,
        "course F1 difference": d["difference"],
        "course F1 difference lo": d["lo"],
        "course F1 difference hi": d["hi"],
        "setting course F1": d["a"],
        "against course F1": d["b"],
        "protocol": protocol,
        "photos": len(y),
        "seeds": ",".join(map(str, range(repeats))),
        "backbone": BACKBONE,
    }


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    photos = REPO.parent / "shared" / "real-coco-train" / "ms-coco"
    ap.add_argument("--data", default=str(photos), help="labelled photos (default: %(default)s)")
    ap.add_argument("--dir", default=str(REPO / "runs" / "evidence"), help="the caches")
    ap.add_argument("--out", default=str(HERE / "evidence.csv"))
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the frozen-phase folds")
    ap.add_argument(
        "--finetune-folds",
        type=int,
        default=1,
        help="folds fine-tuned (0: none; 5: all 678 photos, about 2.5 h here)",
    )
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--limit", type=int, default=0, help="the first N photos only (a smoke test)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    # a fold's 80/20 split names the classes it cannot put on both sides: expected, and repeated
    warnings.filterwarnings("ignore", message="classes on one side")
    t_start = time.perf_counter()
    print(config.keep_freed_memory(), flush=True)
    torch.set_num_threads(args.threads)
    work = Path(args.dir).expanduser().resolve()
    (work / "folds").mkdir(parents=True, exist_ok=True)
    log = lambda line: print(line, flush=True)  # noqa: E731
    ev = Evidence(Path(args.data), work, args.limit, args.folds, log)
    rows = [row(ev, spec, args.repeats, args.finetune_folds) for spec in ROWS]
    table = pd.DataFrame([r for r in rows if r]).round(3)
    with files.atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False)
    pd.set_option("display.width", 200)
    print(table.drop(columns=["backbone"]).to_string(index=False))
    print(f"wrote {args.out}; {time.perf_counter() - t_start:.0f} s in all")


if __name__ == "__main__":
    import run  # the environment run.py gives the notebooks' kernels

    start = {k: v for k, v in run.kernel_environment().items() if k != "COCO_HEADLESS"}
    if any(os.environ.get(k) != v for k, v in start.items()):
        # OpenMP and glibc read these only when a process starts: start again with them. With
        # OpenMP's threads spinning while they wait, a phase-1 epoch took 17 s here instead of
        # 1.5 s (2 threads, load 10)
        os.environ.update(start)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    main()
