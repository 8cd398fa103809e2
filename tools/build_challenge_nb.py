"""Write challenge.ipynb from the cell sources below (run once; outputs come from run.py)."""
import json
import sys
from pathlib import Path

CELLS = []


def md(text):
    CELLS.append(("markdown", text.strip("\n")))


def code(text, tags=None):
    CELLS.append(("code", text.strip("\n"), tags or []))


md('''
# MS COCO multi-label challenge: train, compare, tune, submit

This notebook is the main program of a team: it glues the course's building blocks
(`helpers.py`: the two datasets, `train_loop`, `validation_loop`, `update_graphs`) into the
whole workflow. For each ImageNet backbone it trains a new head with the backbone **frozen**,
then **fine-tunes** everything; it picks per-class thresholds on a validation split, compares
the models and their ensemble, and writes the leaderboard's JSON.

* **On the course JupyterHub (GPU):** run it top to bottom; the defaults of the parameters
  cell are the real run on `/home/jovyan/ms-coco`.
* **Anywhere else:** with no data folder given and none at the course's path, it generates a
  small **demo dataset** (coloured shapes in the challenge layout) and says so, so every cell
  runs offline on a laptop CPU. `COCO_SMOKE=1` shrinks everything to a one-minute run.
* An interrupted run continues from its last completed epoch when the notebook is run again.
  A run folder is never reused with other settings: the run stops and says what differs.

> **The outputs stored in this notebook come from one top-to-bottom run on the generated
> demo data, on a 2-core CPU, with the offline EfficientNet-Lite0 backbone** (`README.md`
> gives the command). They show what the cells print; they are not course-data results.

The pieces (one epoch, one evaluation, one checkpoint) come from `helpers.py` and the package
`cocochallenge/`; the model, the optimiser, the epoch loop and the decisions are here.
''')
md('''
## 1. Imports
`helpers` is the course's code; `cocochallenge` is the rest of the library, one module per concern.
''')
code('''
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch: idle OpenMP threads sleep, not spin (CPU)
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch.utils.tensorboard import SummaryWriter

import helpers as h
from cocochallenge import (budget, checkpoints, config, data, files, losses, metrics, models, plots, runs,
                           split, submission, training, transforms)

pd.set_option("display.precision", 4)
''')
md('''
## 2. Parameters
One cell, tagged `parameters` (papermill can override it). Every value can also be set by an
environment variable `COCO_<NAME>`, e.g. `COCO_BACKBONES=efficientnet_lite0`, which wins over
this cell. The defaults are the real GPU run on the course data.
''')
code('''
DATA_ROOT = ""                  # challenge-layout folder; "" = the course's /home/jovyan/ms-coco, else demo data
RUN_DIR = "runs/main"           # everything of this run is written here (checkpoints, scores, submission)
BACKBONES = ["convnext_tiny", "efficientnet_v2_s", "mobilenet_v3_large"]   # registry names, see models.BACKBONES
# projected GPU time of this default run on the course data, at reference rates (section 3):
# convnext_tiny 0.18 h, efficientnet_v2_s 0.49 h, mobilenet_v3_large 0.07 h
EPOCHS_FROZEN = 6               # phase 1: backbone frozen, only the head learns (on cached features: cheap)
EPOCHS_FINETUNE = 8             # phase 2: everything learns, backbone at a lower learning rate (58,000 images
                                # at batch 64: 7,250 steps, the first epoch a warm-up)
BATCH_SIZE = 64
LR_HEAD = 1e-3                  # phase 1 learning rate (AdamW)
LR_FINETUNE = 3e-4              # phase 2 learning rate of the head ...
BACKBONE_LR_FACTOR = 0.1        # ... and the backbone's, as a fraction of it
WEIGHT_DECAY = 1e-4
FREEZE_BN = True                # fine-tuning keeps BatchNorm's ImageNet statistics (scale and shift still learn)
EMA_EPOCHS = 1.0                # fine-tuning also keeps a moving average of the weights over ~1 epoch; 0 = off
LOSS = "bce"                    # "bce" (the course's BCEWithLogitsLoss) or "asl" (asymmetric loss)
HEAD = "mlp"                    # "mlp" (the course's head), "linear", or "logistic" (one convex fit, frozen only)
LOGISTIC_C = 0.1                # inverse L2 strength of the "logistic" head (on z-scored features)
DROPOUT = 0.2
AUGMENT = "trivial"             # "trivial" (TrivialAugmentWide), "randaugment" or "none"
PAD = False                     # False: the course's plain resize (measured better); True: keep the aspect, pad
IMG_SIZE = 0                    # 0 = the input size of the backbone's weights
VAL_FRACTION = 0.1
SEED = 0
RETRAIN = []                    # backbones to train again although this run folder has them; ["all"]: everything
REFIT = False                   # then train each backbone again on train + validation for its chosen epochs (2x the time)
DEVICE = "auto"                 # "auto", "cuda", "cpu"
WORKERS = -1                    # DataLoader workers; -1 = chosen for the device
AMP = True                      # mixed precision on CUDA (bfloat16 where supported)
CHANNELS_LAST = True
COMPILE = False                 # torch.compile for fine-tuning (opt-in: long first epoch)
TTA = True                      # horizontal-flip test-time augmentation
AT_LEAST_ONE = True             # every image gets at least its most probable class
MIN_POSITIVES = 5               # classes with fewer validation positives use the global threshold
SHRINK = 10                     # out-of-fold thresholds: per class, pulled toward the global one by SHRINK positives
DEMO_DIR = "data/demo/ms-coco"  # where demo data is generated when no course data is found
DEMO_TRAIN = 1000
DEMO_TEST = 200
MAX_IMAGES = 0                  # 0 = all training images
PROGRESS = True                 # tqdm progress bars
SMOKE = False                   # tiny sizes: the whole notebook in a minute or two on a CPU
''', ["parameters"])
md('''
The environment overrides the cell above and the smoke setting shrinks the sizes: the table shows
the values in force, and which of them differ from the cell. Those values replace the cell's names.
''')
code('''
# NBVAL_CHECK_OUTPUT
cfg = config.notebook_config(globals())
in_cell = {k: globals()[k.upper()] for k in cfg}
globals().update({k.upper(): v for k, v in cfg.items()})
pd.DataFrame({"value": {k: str(v) for k, v in cfg.items()},
              "set by": {k: "environment" if v != in_cell[k] else "" for k, v in cfg.items()}})
''')
md('''
## 3. Device
CUDA when present; on a GPU, mixed precision (bfloat16 where the card supports it), channels-last
tensors, pinned memory and several loader workers. On a CPU the same code runs in float32.
''')
code('''
device = config.pick_device(DEVICE)
amp_dtype, scaler = training.amp_settings(device, AMP)
torch.backends.cudnn.benchmark = True
print(f"device: {device}" + (f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else
                             f" ({torch.get_num_threads()} threads)"))
print(f"mixed precision: {amp_dtype or 'off (float32)'}")
if device.type == "cpu" and EPOCHS_FINETUNE > 0 and BATCH_SIZE > 32:
    print(f"note: fine-tuning at batch {BATCH_SIZE} on a CPU holds about 80 MB of activations per image "
          f"(Lite0, 224 px: 6 GB at batch 64); BATCH_SIZE = 32 keeps a run under 4 GB")
''')
md('''
What these settings would cost on a GPU on the course data (58,000 training images), per backbone:
projected from reference rates (timm's published training images/s on an RTX 3090 with mixed
precision, scaled to each input size; the loader capped at 8 workers), not measured here.
`python benchmark.py --device cuda` measures your GPU.
''')
code('''
# NBVAL_CHECK_OUTPUT
size_of = lambda name: models.preprocess_for(name, IMG_SIZE)["size"]
hours = budget.projected_hours(BACKBONES, size_of, EPOCHS_FINETUNE, tta=TTA, ema=EMA_EPOCHS > 0)
pd.DataFrame({"input px": {n: size_of(n) for n in BACKBONES},
              "paced by": {n: budget.reference_rates(n, size_of(n))["bound"] for n in BACKBONES},
              "projected GPU hours": {n: round(v, 2) for n, v in hours.items()}})
''')
md('''
## 4. Data, class statistics and the split
The course data if it is there, else demo data (generated once and reused). Every file is looked
at before any training (unreadable images are skipped and named), all label files are read once
into a multi-hot matrix by the course's `COCOTrainImageDataset`, and a digest of the data is kept
so that a run folder is never reused on other data.
''')
code('''
# NBVAL_CHECK_OUTPUT
data_root, is_demo = data.resolve_data_root(DATA_ROOT, DEMO_DIR, DEMO_TRAIN, DEMO_TEST, SEED)
if is_demo:
    print(f"No data root given and no course data at {data.COURSE_DATA_ROOT}: using GENERATED DEMO DATA in "
          f"{data_root}.\\nFor the real run set DATA_ROOT (or COCO_DATA_ROOT) to the unzipped ms-coco folder.")
paths = data.data_paths(data_root)
scan = data.scan_data(data_root)
train_set = h.COCOTrainImageDataset(paths["train_images"], paths["train_labels"], max_images=MAX_IMAGES or None)
train_set.drop(scan["skip"])
test_set = h.COCOTestImageDataset(paths["test_images"])
data.report_data(scan, train_set.label_notes)
data_id = data.data_fingerprint(train_set, test_set)
print(f"data: {files.shown_path(data_root)}: {len(train_set)} labelled and {len(test_set)} test images "
      f"(digest {data_id})")
''')
md('''
The split is **stratified over all 80 labels** (a random split leaves the rarest classes with a
handful of validation images), seeded, and saved in the run folder with its seed, fraction and
data digest: the analysis notebook and later runs use the same images, and a changed setting
stops the run instead of being silently overridden.
''')
code('''
# NBVAL_CHECK_OUTPUT
run_dir = Path(RUN_DIR).expanduser()
run_dir.mkdir(parents=True, exist_ok=True)
train_idx, val_idx = split.load_or_make_split(train_set, run_dir / "split.json", VAL_FRACTION, SEED, data_id,
                                              replace="all" in RETRAIN)
split_id = files.load_json(run_dir / "split.json")["id"]
y_train, y_val = train_set.labels[train_idx], train_set.labels[val_idx]
print(f"{len(train_idx)} train / {len(val_idx)} validation images (split {split_id}); "
      f"run folder: {files.shown_path(run_dir)}")
''')
md('''
Classes are very imbalanced (person is in about half of the images): that is why rare classes
need their own thresholds, and why the head's bias starts at each class's log-odds.
''')
code('''
# NBVAL_CHECK_OUTPUT
stats = data.class_statistics(train_set.labels)
stats["val images"] = y_val.sum(0)
ax = stats.sort_values("images", ascending=False).plot.bar(x="class", y="images", figsize=(15, 3.5),
                                                           logy=True, legend=False, width=0.8)
ax.set_ylabel("images (log scale)"); ax.set_title("images per class in the labelled set")
plt.tight_layout(); plt.show()
print(f"labels per image: {train_set.labels.sum(1).mean():.2f} (max {train_set.labels.sum(1).max()})")
assert (stats["val images"][stats["images"] >= 2] > 0).all(), "every class with 2+ images is in validation"
stats.sort_values("images").head(5)
''')
md('''
## 5. Models
Each backbone comes from the registry with its ImageNet weights and a new 80-output head (the
course's MLP: Linear, Hardswish, Dropout, Linear), its output bias at the class log-odds. The
preprocessing (input size, normalisation) is that of *those* weights. Without internet,
torchvision's weights cannot be downloaded: the error says so and names the offline backbones.
''')
code('''
# NBVAL_CHECK_OUTPUT
pd.DataFrame({n: {**models.BACKBONES[n], **models.preprocess_for(n, IMG_SIZE)} for n in BACKBONES}).T[
    ["kind", "weights", "dim", "size", "mean"]]
''')
md('''
The first backbone, built and printed in short: freezing leaves only the head's parameters to learn.
''')
code('''
# NBVAL_CHECK_OUTPUT
model, _ = models.build_model(BACKBONES[0], head=HEAD, dropout=DROPOUT, prior=y_train.mean(0))
before = models.describe(model)
models.freeze_backbone(model)
print(model.head)
pd.DataFrame({"before freezing": before, "frozen backbone": models.describe(model)})
''')
md('''
Each backbone gets its own transforms (its input size and normalisation): the evaluation ones
(a plain resize to a square, as the course does, or an aspect-keeping resize and pad with `PAD`;
on real photos the plain resize scored higher, see `analysis.ipynb`, section 9) for features,
validation and test; the training ones add a flip, TrivialAugment and random erasing. Each loader view has its own transform, so augmentation never
leaks into validation.
''')
code('''
def loaders_for(pre):
    """Loaders of one backbone: train images for the features (no augmentation), val, test, augmented train."""
    eval_t = transforms.build_transform(pre, train=False, pad=PAD)
    train_t = transforms.build_transform(pre, train=True, pad=PAD, augment=AUGMENT)
    workers = None if WORKERS < 0 else WORKERS
    make = lambda ds, train: transforms.make_loader(ds, BATCH_SIZE if train else 2 * BATCH_SIZE, train,
                                                    device, workers)
    return {"features": make(train_set.subset(train_idx, eval_t), False),
            "val": make(train_set.subset(val_idx, eval_t), False),
            "test": make(data.with_transform(test_set, eval_t), False),
            "train": make(train_set.subset(train_idx, train_t), True),
            "train+val": make(train_set.subset(np.concatenate([train_idx, val_idx]), train_t), True)}
''')
md('''
## 6. Loss, optimiser and schedule
`BCEWithLogitsLoss` is the course's choice; the asymmetric loss (ASL, timm's) down-weights the
many easy negatives. Phase 1 trains the head with AdamW; phase 2 uses AdamW (fused on CUDA) with
the backbone at `BACKBONE_LR_FACTOR` of the head's rate and no weight decay on norms and biases.
Both decay along a cosine per step; phase 2 starts with a one-epoch linear warm-up.
''')
code('''
criterion = losses.make_criterion(LOSS)

def head_optimizer(model, steps_per_epoch):
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=LR_HEAD, weight_decay=WEIGHT_DECAY)
    return optimizer, training.warmup_cosine(optimizer, steps_per_epoch * EPOCHS_FROZEN)

def finetune_optimizer(model, steps_per_epoch):
    groups = models.param_groups(model, LR_FINETUNE, BACKBONE_LR_FACTOR, WEIGHT_DECAY)
    optimizer = training.make_optimizer(groups, device, LR_FINETUNE)
    total = steps_per_epoch * EPOCHS_FINETUNE
    return optimizer, training.warmup_cosine(optimizer, total, warmup_steps=min(steps_per_epoch, total // 5))
print(criterion)
''')
md('''
The fine-tuning optimiser of the model above, group by group (the backbone learns 10x slower):
''')
code('''
# NBVAL_CHECK_OUTPUT
models.unfreeze_backbone(model)
optimizer, _ = finetune_optimizer(model, steps_per_epoch=100)
pd.DataFrame([{"part": "backbone" if i < 2 else "head", "lr": g.get("initial_lr", g["lr"]), "weight decay": g["weight_decay"],
               "tensors": len(g["params"]), "parameters": sum(p.numel() for p in g["params"])}
              for i, g in enumerate(optimizer.param_groups)])
''')
code('''
del model, optimizer                   # the training loop builds its own
''')
md('''
## 7. The epoch loop
One phase: for each epoch, the course's `train_loop` (one pass with zero_grad, backward, step),
the course's `validation_loop` (loss, course F1 and, completed, the probabilities for mAP),
TensorBoard through the course's `update_graphs`, then a checkpoint: the last epoch always (to
resume), the best epoch by validation mAP (threshold-free: thresholds are tuned afterwards).
Every generator is reseeded from `(SEED, epoch)`, so a resumed run draws the same batches.
''')
code('''
def run_phase(phase, epochs, net, train_loader, val_loader, optimizer, scheduler, ckpt, writer, offset=0, ema=None):
    amp = dict(amp_dtype=amp_dtype if phase.endswith("finetune") else None, channels_last=CHANNELS_LAST)
    validate = lambda m: h.validation_loop(val_loader, m, criterion, h.NUM_CLASSES, device, multi_label=True,
                                           th_multi_label=0.0, one_hot=True, keep_outputs=True, **amp)  # logit 0 = p 0.5
    for epoch in range(ckpt.resume(), epochs):              # 0, or the epoch after the last saved one
        checkpoints.seed_epoch(SEED, epoch)
        t0 = time.perf_counter()
        train_res = h.train_loop(train_loader, net, criterion, optimizer, device, scheduler=scheduler, ema=ema,
                                 scaler=scaler if phase.endswith("finetune") else None, show_progress=PROGRESS, **amp)
        val_res, ema_res = validate(net), (validate(ema.module) if ema else None)
        h.update_graphs(writer, offset + epoch, train_res, val_res)
        training.log_scalars(writer, phase, offset + epoch + 1, train_res, val_res, ema_res)
        row = checkpoints.epoch_row(phase, epoch, offset, time.perf_counter() - t0, train_res, val_res, ema_res)
        use_ema = ema_res is not None and ema_res["mAP"] > val_res["mAP"]   # the better of the two weights
        improved = ckpt.save(epoch, row, score=max(val_res["mAP"], ema_res["mAP"] if ema_res else -1),
                             best_module=ema.module if use_ema else None)
        print(checkpoints.epoch_line(row, epochs, improved))
    return ckpt
''')
md('''
**Phase 1, frozen backbone.** The backbone's output does not change while it is frozen and its
inputs are not augmented, so it is computed **once** (and saved: a restarted session reuses it);
the head then trains for many epochs on those features, with the same course loops over a loader
of cached features instead of images.
''')
code('''
def frozen_features(model, name, out, loaders):
    key = {"backbone": name, **settings[name]["input"], "pad": PAD, "images": split_id}
    return {part: training.cached_features(out / f"features_{part}.pt", model.backbone, loaders[loader], device,
                                           key={**key, "part": part}, amp_dtype=amp_dtype,
                                           channels_last=CHANNELS_LAST, show_progress=PROGRESS)
            for part, loader in (("train", "features"), ("val", "val"))}

def train_head(model, feats, y, val_feats, folder, epochs, writer, phase="frozen"):
    train_feats = training.feature_loader(feats, y, BATCH_SIZE, shuffle=True)
    optimizer, scheduler = head_optimizer(model, len(train_feats))
    ckpt = checkpoints.PhaseCheckpoint(folder, "frozen", {"model": model.head, "optimizer": optimizer,
                                                          "scheduler": scheduler})
    return run_phase(phase, epochs, model.head, train_feats, val_feats, optimizer, scheduler, ckpt, writer)

def train_frozen(model, name, out, loaders, writer):
    models.freeze_backbone(model)
    feats = frozen_features(model, name, out, loaders)
    if HEAD == "logistic":                    # the offline CPU recipe: one convex fit instead of epochs
        return fit_frozen_logistic(model, out, feats)
    val_feats = training.feature_loader(feats["val"], y_val, 4096, shuffle=False)
    return train_head(model, feats["train"], y_train, val_feats, out, EPOCHS_FROZEN, writer)
''')
md('''
With `HEAD = "logistic"` the frozen phase is one L2-regularised logistic regression on z-scored
features (L-BFGS, no epochs to choose), plus out-of-fold scores of every training image from five
more fits on the other folds: thresholds are then tuned on those, and the validation split is left
to measure them. It is the recipe that scored best on real photos within a CPU budget.
''')
code('''
def fit_frozen_logistic(model, out, feats):
    ckpt = checkpoints.PhaseCheckpoint(out, "frozen", {"model": model.head})
    if ckpt.resume() == 0:
        t0 = time.perf_counter()
        model.head[-1].load_state_dict(training.fit_logistic(feats["train"], y_train, C=LOGISTIC_C).state_dict())
        oof = training.out_of_fold_probs(feats["train"], y_train, C=LOGISTIC_C, seed=SEED)
        files.save_npz(out / "train_oof.npz", probs=oof, targets=y_train)
        scores = {part: h.validation_loop(training.feature_loader(feats[part], y, 4096, False), model.head, criterion,
                                          h.NUM_CLASSES, device, multi_label=True, th_multi_label=0.0,
                                          one_hot=True, keep_outputs=True)
                  for part, y in (("train", y_train), ("val", y_val))}
        row = checkpoints.epoch_row("frozen", 0, 0, time.perf_counter() - t0, scores["train"], scores["val"])
        ckpt.save(0, row, score=scores["val"]["mAP"])
        print(checkpoints.epoch_line(row, 1, True))
    return ckpt
''')
md('''
**Phase 2, fine-tuning.** Everything learns on augmented images, starting from the best frozen
head; BatchNorm keeps its ImageNet statistics (`FREEZE_BN`). A moving average of the weights
(`EMA_EPOCHS`, timm's `ModelEmaV3`) is validated beside the raw weights after every epoch, and
the best checkpoint keeps whichever of the two scored higher (the "EMA" column of the epoch lines).
''')
code('''
def fine_tune(model, folder, train_loader, val_loader, epochs, writer, ema_epochs, phase="finetune"):
    models.unfreeze_backbone(model)
    model.freeze_bn = FREEZE_BN
    optimizer, scheduler = finetune_optimizer(model, len(train_loader))
    ema = training.make_ema(model, len(train_loader), ema_epochs)
    ckpt = checkpoints.PhaseCheckpoint(folder, "finetune", {"model": model, "optimizer": optimizer,
                                                            "scheduler": scheduler, "scaler": scaler, "ema": ema})
    net = torch.compile(model) if COMPILE else model
    return run_phase(phase, epochs, net, train_loader, val_loader, optimizer, scheduler, ckpt, writer,
                     offset=EPOCHS_FROZEN, ema=ema)
''')
md('''
The better phase by validation mAP is kept (for fine-tuning, the raw weights or their average,
whichever the best checkpoint holds). When fine-tuning did not help, the best frozen head goes
back on an untouched ImageNet backbone.
''')
code('''
def keep_best(model, name, frozen, tuned):
    if tuned is not None and tuned.best > frozen.best:
        tuned.load_best(model)               # the raw weights or their moving average, whichever scored
        row = tuned.history[tuned.best_epoch - 1]
        return model, "finetune (EMA)" if row.get("ema_mAP", -1) > row["val_mAP"] else "finetune"
    if tuned is not None:                    # fine-tuning changed the backbone: a fresh one
        model, _ = models.build_model(name, head=HEAD, dropout=DROPOUT)
        model.to(device, memory_format=torch.channels_last if CHANNELS_LAST else torch.preserve_format)
    frozen.load_best(model.head)
    return model, "frozen"
''')
md('''
**Optional refit** (`REFIT = True`). The validation split chose the phase, its best epochs and
the thresholds; the refit trains the backbone once more on the training *and* validation images,
with the same schedules stopped at those epochs (the moving average too, if it was kept), and
this model scores the test images. Its validation scores would be in-sample, so thresholds,
comparison and analysis keep using the first model's; the epoch lines of a refit show in-sample
validation. Its checkpoints (`refit/`) resume like the others.
''')
code('''
def refit_frozen(name, out, frozen, loaders, writer):
    y_all = np.concatenate([y_train, y_val])          # the order of the train+val features below
    model, _ = models.build_model(name, head=HEAD, dropout=DROPOUT, prior=y_all.mean(0))
    model.to(device, memory_format=torch.channels_last if CHANNELS_LAST else torch.preserve_format)
    models.freeze_backbone(model)
    feats = frozen_features(model, name, out, loaders)
    feats_all = torch.cat([feats["train"], feats["val"]])
    if HEAD == "logistic":
        model.head[-1].load_state_dict(training.fit_logistic(feats_all, y_all, C=LOGISTIC_C).state_dict())
    else:
        train_head(model, feats_all, y_all, training.feature_loader(feats["val"], y_val, 4096, False),
                   out / "refit", frozen.best_epoch, writer, phase="refit_frozen")
    return model
''')
code('''
def refit(name, out, phase, frozen, tuned, loaders, writer):
    model = refit_frozen(name, out, frozen, loaders, writer)
    if phase.startswith("finetune"):                 # the average too, if it was the one kept
        ckpt = fine_tune(model, out / "refit", loaders["train+val"], loaders["val"], tuned.best_epoch, writer,
                         ema_epochs=EMA_EPOCHS if phase == "finetune (EMA)" else 0, phase="refit_finetune")
        if ckpt.state["ema"] is not None:
            model.load_state_dict(ckpt.state["ema"].module.state_dict())
    return model
''')
md('''
**Before any training**, every backbone's stored settings are compared with the settings in force
(the training ones, the input size and normalisation, the data digest and the split). A finished
backbone with the same settings is reused, a half-trained one resumes, and one made differently
stops the run with the list of differences (unless it is named in `RETRAIN`). Settings that act
after training (thresholds, TTA, the top-1 guarantee, the ensemble) never need a retraining.
''')
code('''
settings, status = {}, {}
for name in BACKBONES:
    settings[name] = runs.model_settings(name, cfg, models.preprocess_for(name, IMG_SIZE), data_id, split_id,
                                         amp_dtype)
    status[name] = runs.check_model(run_dir, settings[name], retrain="all" in RETRAIN or name in RETRAIN)
runs.prepare_run_dir(cfg)                    # config.json: written once the folder is known to agree
pd.Series(status, name="status").to_frame()
''')
md('''
After training, the kept model's validation and test probabilities (plain and with flip TTA) are
saved for thresholds, the ensemble and the analysis; `result.json`, written last, marks the
backbone as finished.
''')
code('''
def save_backbone(name, model, phase, frozen, tuned, loaders, seconds, test_model=None):
    result = {"name": name, "best_phase": phase, "best_val_mAP": max(frozen.best, tuned.best if tuned else -1),
              "train_seconds": seconds, "parameters": models.count_parameters(model), "refit": test_model is not None}
    return runs.save_model_scores(model, run_dir / "models" / name, loaders["val"], loaders["test"], device, result,
                                  frozen.history + (tuned.history if tuned else []), test_model=test_model,
                                  amp_dtype=amp_dtype, channels_last=CHANNELS_LAST, show_progress=PROGRESS)
''')
md('''
**The loop over backbones**: build, phase 1, phase 2, keep the better one, refit it if asked, save its scores.
''')
code('''
results = {}
for name in BACKBONES:
    out = run_dir / "models" / name
    if status[name] == "done":
        results[name] = files.load_json(out / "result.json"); print(f"{name}: trained with these settings, reused")
        continue
    files.save_json(settings[name], out / "settings.json")
    t0 = time.perf_counter(); config.seed_everything(SEED)
    model, _ = models.build_model(name, head=HEAD, dropout=DROPOUT, prior=y_train.mean(0))
    model.to(device, memory_format=torch.channels_last if CHANNELS_LAST else torch.preserve_format)
    loaders = loaders_for(models.preprocess_for(name, IMG_SIZE))
    with SummaryWriter(str(run_dir / "tensorboard" / name)) as writer:
        frozen = train_frozen(model, name, out, loaders, writer)
        tuned = fine_tune(model, out, loaders["train"], loaders["val"], EPOCHS_FINETUNE, writer, EMA_EPOCHS) \
            if EPOCHS_FINETUNE > 0 else None
        model, phase = keep_best(model, name, frozen, tuned)
        test_model = refit(name, out, phase, frozen, tuned, loaders, writer) if REFIT else None
    results[name] = save_backbone(name, model, phase, frozen, tuned, loaders, time.perf_counter() - t0, test_model)
    del model, loaders
pd.DataFrame(results).T[["best_phase", "best_val_mAP", "train_seconds", "parameters"]]
''')
md('''
The training curves, from the saved history (the same numbers TensorBoard shows).
''')
code('''
plots.plot_history(run_dir, BACKBONES);
plt.show()
''')
md('''
TensorBoard inside JupyterLab, on this run's folder (behind JupyterHub, see the README).
''')
code('''
# NBVAL_SKIP
import os
if os.environ.get("COCO_HEADLESS") == "1":        # run.py executes the notebook without a browser
    print(f"headless run: TensorBoard not opened; its logs are in {run_dir / 'tensorboard'}")
else:
    if "JUPYTERHUB_SERVICE_PREFIX" in os.environ:  # behind JupyterHub: through jupyter-server-proxy
        os.environ.setdefault("TENSORBOARD_PROXY_URL", os.environ["JUPYTERHUB_SERVICE_PREFIX"] + "proxy/%PORT%/")
    os.environ["TENSORBOARD_BINARY"] = config.tensorboard_binary()   # the kernel's own, even off PATH
    %load_ext tensorboard
    %tensorboard --logdir {run_dir / "tensorboard"}
''')
md('''
## 8. Thresholds, flip TTA and the ensemble
All scores below are on the validation split, from probabilities averaged over each image and
its mirror (flip TTA). Columns: the course recipe (raw outputs > 0.5, i.e. probability > 0.62),
probability > 0.5, the best single threshold, per-class thresholds (scored on the images they
were tuned on: optimistic) and per-class thresholds **held out** (tuned on one half of the
validation images, scored on the other: what to expect on the test set). The ensemble averages
the models' probabilities and gets its own thresholds.
''')
code('''
table, details = runs.compare_models(run_dir, BACKBONES, TTA, MIN_POSITIVES, AT_LEAST_ONE, SHRINK)
for name, d in details.items():
    assert ((d["thresholds"] > 0) & (d["thresholds"] < 1)).all(), name
cols = ["f1_logit_0.5", "f1_0.5", "global_threshold", "f1_global", "f1_per_class", "f1_per_class_heldout",
        "f1_oof_halves", "f1_oof_thresholds", "macro_f1_oof_thresholds", "macro_f1", "mAP", "train_minutes"]
table[[c for c in cols if c in table]].T     # one column per model: fits the page
''')
md('''
The model (or ensemble) with the best held-out course F1 makes the test predictions. When the run
has out-of-fold scores of its training images, that is `f1_oof_halves`: thresholds tuned on a random
half of them, scored on the other half, averaged over 10 partitions (hundreds of images, not one
split of a few dozen); `f1_oof_thresholds` then checks the final thresholds on the validation split,
which they never saw. Otherwise it is `f1_per_class_heldout`: per-class thresholds tuned on one half
of the validation split and scored on the other.
''')
code('''
pick = "f1_oof_halves" if "f1_oof_halves" in table else "f1_per_class_heldout"
best = table[pick].idxmax()
chosen = details[best]
print(f"chosen: {best}  (validation course F1 with thresholds it did not see, {pick}: {table.loc[best, pick]:.4f})")
''')
md('''
## 9. Test predictions and the JSON
The chosen thresholds applied to the test probabilities; the submission is validated against the
test folder (every image once, class indices 0..79) before it is written, atomically, keeping any
previous valid file as a `.bak`.
''')
code('''
# NBVAL_CHECK_OUTPUT
pred = metrics.apply_thresholds(chosen["test"], chosen["thresholds"], AT_LEAST_ONE)
sub = submission.predictions_to_submission(chosen["test_stems"], pred)
path = submission.write_submission(sub, run_dir / "submission.json", paths["test_images"])
assert len(sub) == len(test_set) and set(sub) == set(test_set.stems)
assert all(len(v) >= 1 for v in sub.values()) or not AT_LEAST_ONE
print(f"submission: {files.shown_path(path)}: {len(sub)} test images, each once")
summary = files.save_json({"chosen": best, "submission": str(path), "data_root": str(data_root),
                           "demo": is_demo}, run_dir / "summary.json")
''')
md('''
When answers for the test images exist (only for demo data or the real-photo check set, never for
the challenge), the submission is scored exactly like the leaderboard would.
''')
code('''
print(f"{pred.sum(1).mean():.2f} labels per test image on average")
answers = runs.find_answers(data_root)
if answers:
    print(f"scored against {files.shown_path(answers)}:")
    scores = submission.score_submission(path, answers)
    print("\\n".join(f"{k:>12}: {v:.4f}" if isinstance(v, float) else f"{k:>12}: {v}" for k, v in scores.items()))
else:
    print("no answers for these test images: upload the file to the leaderboard")
''')


def build(path):
    nb = {"cells": [], "metadata": {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}}, "nbformat": 4, "nbformat_minor": 5}
    for i, cell in enumerate(CELLS):
        kind, text = cell[0], cell[1]
        c = {"cell_type": kind, "id": f"c{i:02d}", "metadata": {}, "source": text.splitlines(True)}
        if kind == "code":
            c.update(execution_count=None, outputs=[])
            if cell[2]:
                c["metadata"]["tags"] = cell[2]
        nb["cells"].append(c)
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    build(sys.argv[1] if len(sys.argv) > 1 else "challenge.ipynb")
