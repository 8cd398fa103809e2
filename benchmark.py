"""Speed and memory benchmark of the library against the course's way.

    python benchmark.py                     # default: ~5 min on an idle 2-core CPU, ~10 when busy
    python benchmark.py --quick             # tiny sizes, under a minute (tests/test_benchmark.py)
    python benchmark.py --course-epochs 3   # time 3 course epochs of 20, extrapolate (busy machine)
    python benchmark.py --device cuda       # on a GPU: adds maxvit_t and convnext_tiny_in22k
    python benchmark.py --data-dir data/bench --json runs/benchmark.json   # keep data, save JSON

On generated challenge-layout data (``cocochallenge.demo``), on the current device, it
measures, each time the course's way against the library's:

1. frozen phase, ``--epochs`` epochs on ``--n-images`` images: the course's ``train_loop``
   over a DataLoader (backbone recomputed every epoch) against cached features
   (``extract_features`` once, then the same ``train_loop`` over the cached features), wall
   time and validation mAP. Both sides start from the same head, see the same batch order and
   the same dropout masks, so their mAPs differ only by the float16 rounding of the cache;
2. training DataLoader throughput: ``DataLoader(ds, B, shuffle=True)`` with the course's
   ``Resize((224, 224))`` transform in the main process, against ``make_loader`` with the
   library's training transform (flip, TrivialAugment, erasing) and the device's workers (none
   on a CPU, ``config.device_choices``);
3. fine-tuning throughput per backbone on random tensors (compute only): the course's
   ``train_loop`` as the course calls it (fp32, contiguous, plain AdamW), against the same loop
   on a channels-last model with ``amp_settings`` autocast (none on the CPU) and
   ``make_optimizer`` (fused AdamW on CUDA);
4. test inference throughput, without and with flip TTA (``predict``);
5. peak memory of each part (process RSS; CUDA max allocated on a GPU);
6. building the training dataset and the split from ``--label-files`` generated ``.cls`` files,
   in a subprocess so that its peak RSS is its own;
7. on a CPU, glibc's default allocator against keeping freed memory (``mallopt`` in the
   process, ``config.keep_freed_memory``, which this process uses unless ``--keep-freed-memory
   no``; and ``GLIBC_TUNABLES`` from its start, as run.py does): wall, user and system seconds
   and minor page faults of both paths, each in fresh processes: the CPU recipe's feature
   pass at 384 px, and the notebook's fine-tuning epoch and validation with its loaders;
8. the analysis at the course's size, on synthetic scores of 6,500 validation images x 80
   classes (COCO-like class imbalance) and 3 networks, in a fresh process (its own peak RSS):
   the paired comparison (``compare.cross_fitted`` then ``compare.compare``, 1,000 resamples)
   and the analysis notebook's computations, step by step.

Part 1 also times the feature pass at two sizes (a quarter of the images and all of them), as
one pass over train and validation (``training.extract_feature_parts``) and as two loaders,
one per part: the straight line through the two gives its fixed cost (workers' start-up, the
pipeline's first batch) and its cost per image, and the frozen phase's speed-up is projected
to the course's size. Part 6 also builds the notebook's five loaders for the ids of the label
files (no image is read before a batch is drawn).

It prints a table and, as the last line, one JSON object with every figure, the settings and
pass/fail booleans against the targets. The two ways are timed in alternation, several
rounds each, and the best round of each way is kept (as ``timeit`` does: other processes can
only add time), so a busy shared machine does not favour one side; the raw timings of every
round are in the JSON, and part 1 also reports plain wall-clock figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Sampler, Subset

import helpers as h
from cocochallenge import (
    budget,
    config,
    data,
    demo,
    files,
    metrics,
    models,
    split,
    training,
    transforms,
)

ROOT = Path(__file__).resolve().parent
IMAGENET = models.preprocess_for("resnet50")  # ImageNet's mean and std, as torchvision's weights

#: The notebook's default real run (parameters cell of challenge.ipynb), for the projection.
REAL_RUN = {
    "backbones": ["maxvit_t", "convnext_tiny_in22k", "regnet_y_16gf_swag"],
    "epochs_frozen": 6,
    "epochs_finetune": 8,
    **budget.COURSE_SIZES,
}
GPU_TARGET_BACKBONES = ("maxvit_t", "convnext_tiny_in22k")  # the defaults that fine-tune
TARGETS = {
    "frozen_speedup": 10.0,
    "frozen_map_diff": 0.01,
    "labels_seconds": 15.0,
    "labels_mb": 200.0,
    "gpu_finetune_speedup": 2.0,
}


# =============================================================================================
# Measuring: clocks and memory
# =============================================================================================
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident memory of this process (MB)."""
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory since the last :func:`reset_peak_rss` (else since the start)."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 2**20 if sys.platform == "darwin" else ru / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs``), so a section's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class Section:
    """Times a part of the benchmark and records its peak memory (RSS, CUDA)."""

    def __init__(self, name: str, device: torch.device, memory: dict, verbose: bool = True):
        self.name, self.device, self.memory, self.verbose = name, device, memory, verbose

    def __enter__(self):
        self.resettable = reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.verbose:
            print(f"[benchmark] {self.name} ...", file=sys.stderr, flush=True)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        seconds = time.perf_counter() - self.t0
        self.memory[self.name] = {
            "seconds": seconds,
            "peak_rss_mb": peak_rss_mb(),
            "peak_rss_is_section_own": self.resettable,
            "cuda_max_allocated_mb": (
                torch.cuda.max_memory_allocated(self.device) / 2**20
                if self.device.type == "cuda"
                else None
            ),
        }
        if self.verbose:
            print(f"[benchmark] {self.name} done in {seconds:.1f}s", file=sys.stderr, flush=True)
        return False


def best(seconds) -> float:
    """The shortest of repeated timings: other processes can only add time (as ``timeit``)."""
    return float(np.min(np.asarray(seconds, dtype=np.float64)))


def ratio(a, b):
    return float(a) / float(b) if a and b else None


# =============================================================================================
# 1. Frozen phase: the course loop against cached features
# =============================================================================================
class EpochPermutation(Sampler):
    """``shuffle=True`` with a per-epoch seeded order that the cached-feature path can replay.

    ``torch.randperm(n, generator seeded with seed * 7919 + epoch)``; the cached-feature side
    batches the same permutation (:func:`feature_batches`), so both sides see the same
    batches in the same order.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator()
        gen.manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self):
        return self.n


def feature_batches(feats, targets, order: Sampler, batch_size: int) -> DataLoader:
    """Cached features served in the batches of ``order`` (whole batches per index list).

    Its own generator, as the course side's loader has: creating an iterator then draws its
    base seed there, not from the global generator that the dropout masks come from.
    """
    return DataLoader(
        training.CachedFeatures(feats, targets),
        batch_size=None,
        generator=torch.Generator(),
        sampler=BatchSampler(order, batch_size, drop_last=False),
    )


@torch.no_grad()
def course_probs(net, loader, device) -> np.ndarray:
    """Validation probabilities the course's way: fp32, contiguous, ``no_grad``."""
    net.eval()
    out = [torch.sigmoid(net(x.to(device))).cpu() for x, _ in loader]
    return torch.cat(out).numpy()


def bench_frozen(args, device, ds, Y, train_idx, val_idx) -> dict:
    """Course loop against cached features; the fast path is repeated between course epochs.

    Both sides start from the same head, see the same batches (``EpochPermutation``) and the
    same dropout masks (same global RNG stream), so their mAPs differ only by the float16
    cache. The fast path (seconds) runs ``rounds`` times, spread between the course epochs,
    so a burst of load from other processes hits both sides; the headline figures are best-of
    estimates (best course epoch x epochs; best fast repetition), the wall figures beside them.
    """
    B, E, seed = args.batch_size, args.epochs, args.seed
    course_epochs = min(args.course_epochs or E, E)
    y_train, y_val = Y[train_idx], Y[val_idx]
    torch.manual_seed(seed)
    course_model, pre = models.build_model(
        args.frozen_backbone, pretrained=True, prior=y_train.mean(0)
    )
    pre = {**pre, "size": args.frozen_img_size}
    eval_t = transforms.build_transform(pre, train=False)
    train_set = data.LabelledSubset(ds, train_idx, eval_t)
    val_set = data.LabelledSubset(ds, val_idx, eval_t)
    course_model.to(device)
    models.freeze_backbone(course_model)
    fast_model = copy.deepcopy(course_model).to(memory_format=torch.channels_last)
    head0 = copy.deepcopy(course_model.head.state_dict())
    criterion = nn.BCEWithLogitsLoss()
    amp_dtype, _ = config.amp_settings(device)
    with torch.no_grad():  # warm-up: kernel selection, not timed
        x0 = torch.stack([train_set[i][0] for i in range(min(B, len(train_set)))]).to(device)
        course_model.eval()(x0)
        with training.autocast(device, amp_dtype):
            fast_model.eval()(x0.contiguous(memory_format=torch.channels_last))
    sync(device)

    def fast_run(eval_at: int | None) -> dict:
        """The library's frozen phase, start to end: features once, then the head."""
        fast_model.head.load_state_dict(head0)
        opt = torch.optim.AdamW(fast_model.head.parameters(), lr=args.lr_head, weight_decay=1e-4)
        fkw = dict(amp_dtype=amp_dtype, show_progress=False)
        t_start = time.perf_counter()
        train_loader = transforms.make_loader(train_set, B, False, device)
        val_loader = transforms.make_loader(val_set, B, False, device)
        parts = {"train": train_loader, "val": val_loader}  # one pass: the workers start once
        feats = training.extract_feature_parts(fast_model.backbone, parts, device, **fkw)
        f_train, f_val = feats["train"], feats["val"]
        sync(device)
        t_feat = time.perf_counter()
        order = EpochPermutation(len(f_train), seed)  # the course side's batch order
        feats = feature_batches(f_train, y_train, order, B)
        val_feats = training.feature_loader(f_val, y_val, 4096, shuffle=False)
        torch.manual_seed(seed)  # the course side's dropout masks
        probs_at = None
        for epoch in range(E):
            order.set_epoch(epoch)
            h.train_loop(feats, fast_model.head, criterion, opt, device)
            if epoch + 1 == eval_at:  # compare like with like (cheap)
                probs_at = training.predict(
                    fast_model.head, val_feats, device, show_progress=False
                )["probs"]
        sync(device)
        t_head = time.perf_counter()
        probs = training.predict(fast_model.head, val_feats, device, show_progress=False)["probs"]
        t_end = time.perf_counter()  # the metric itself is not timed (either side)
        fast_map = metrics.mean_average_precision(y_val, probs)
        map_at = None if probs_at is None else metrics.mean_average_precision(y_val, probs_at)
        return {
            "seconds": t_end - t_start,
            "feature_seconds": t_feat - t_start,
            "head_seconds": t_head - t_feat,
            "eval_seconds": t_end - t_head,
            "val_mAP": fast_map,
            "val_mAP_at_course_epochs": fast_map if map_at is None else map_at,
            "loader_workers": train_loader.num_workers,
            "feature_dtype": str(f_train.dtype).replace("torch.", ""),
        }

    def feature_pass(n: int, one_pass: bool) -> float:
        """Seconds of the features of the first ``n`` images (train, then val, 4:1), loaders
        built and started included: one pass over both parts, or one loader per part."""
        n_val = max(1, min(len(val_set), n // 5))
        n_tr = max(1, min(len(train_set), n - n_val))
        sub = {"train": data.LabelledSubset(ds, train_idx[:n_tr], eval_t),
               "val": data.LabelledSubset(ds, val_idx[:n_val], eval_t)}  # fmt: skip
        fkw = dict(amp_dtype=amp_dtype, show_progress=False)
        t0 = time.perf_counter()
        loaders = {k: transforms.make_loader(v, B, False, device) for k, v in sub.items()}
        if one_pass:
            training.extract_feature_parts(fast_model.backbone, loaders, device, **fkw)
        else:
            for loader in loaders.values():
                training.extract_features(fast_model.backbone, loader, device, **fkw)
        sync(device)
        return time.perf_counter() - t0

    # ---- the course's way: train_loop over images, the backbone recomputed each epoch
    sampler = EpochPermutation(len(train_set), seed)
    loader = DataLoader(
        train_set, batch_size=B, sampler=sampler, num_workers=0, generator=torch.Generator()
    )  # own generator: global RNG left to dropout
    opt = torch.optim.AdamW(course_model.head.parameters(), lr=args.lr_head, weight_decay=1e-4)
    repeats = max(1, min(args.rounds, course_epochs))
    fast_after = set(np.linspace(0, course_epochs - 1, repeats).round().astype(int).tolist())
    eval_at = course_epochs if course_epochs < E else None
    torch.manual_seed(seed)  # same dropout masks as the fast side
    epoch_seconds, fast_runs = [], []
    for epoch in range(course_epochs):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        h.train_loop(loader, course_model, criterion, opt, device)
        sync(device)
        epoch_seconds.append(time.perf_counter() - t0)
        if epoch in fast_after:
            rng = torch.get_rng_state()  # keep the course side's dropout stream
            fast_runs.append(fast_run(eval_at))
            torch.set_rng_state(rng)
    n_all = len(train_idx) + len(val_idx)
    sizes = (max(2 * B, n_all // 4), n_all) if n_all > 2 * B else (max(2, n_all // 2), n_all)
    line_rounds = {(way, n): [] for way in ("one pass", "two loaders") for n in sizes}
    rng = torch.get_rng_state()
    for _ in range(max(1, args.rounds)):  # alternate ways and sizes: best of each
        for way, n in line_rounds:
            line_rounds[(way, n)].append(feature_pass(n, way == "one pass"))
    torch.set_rng_state(rng)
    t0 = time.perf_counter()
    probs = course_probs(course_model, DataLoader(val_set, batch_size=B, shuffle=False), device)
    course_eval = time.perf_counter() - t0
    course_map = metrics.mean_average_precision(y_val, probs)
    course = {
        "seconds": min(epoch_seconds) * E + course_eval,
        "seconds_wall": float(np.mean(epoch_seconds)) * E + course_eval,
        "eval_seconds": course_eval,
        "epoch_seconds": epoch_seconds,
        "epoch_seconds_min": float(min(epoch_seconds)),
        "epoch_seconds_mean": float(np.mean(epoch_seconds)),
        "epoch_seconds_max": float(max(epoch_seconds)),
        "epochs_measured": course_epochs,
        "extrapolated": course_epochs < E,
        "val_mAP": course_map,
    }
    best = min(fast_runs, key=lambda r: r["seconds"])
    fast = {
        **best,
        "seconds_wall": float(np.mean([r["seconds"] for r in fast_runs])),
        "repeat_seconds": [r["seconds"] for r in fast_runs],
        "repeats": len(fast_runs),
        "val_mAP_spread": float(np.ptp([r["val_mAP"] for r in fast_runs])),
    }
    feature_dtype = fast.pop("feature_dtype")
    line = feature_line(line_rounds, sizes)
    course_size = course_size_speedup(args, course, fast, line, len(train_idx), len(val_idx))
    return {
        "backbone": args.frozen_backbone,
        "pretrained": True,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "epochs": E,
        "img_size": args.frozen_img_size,
        "batch_size": B,
        "lr_head": args.lr_head,
        "optimizer": "AdamW (constant LR)",
        "course": course,
        "fast": fast,
        "speedup": ratio(course["seconds"], fast["seconds"]),
        "speedup_wall": ratio(course["seconds_wall"], fast["seconds_wall"]),
        "mAP_diff": abs(course_map - fast["val_mAP_at_course_epochs"]),
        "feature_dtype": feature_dtype,
        "feature_line": line,
        "course_size": course_size,
    }


def feature_line(rounds: dict, sizes: tuple) -> dict:
    """Fixed seconds and seconds per image of each way of the feature pass, from the best
    round at two sizes (a straight line through the two points)."""
    out = {"sizes": list(sizes)}
    for way in ("one pass", "two loaders"):
        small, large = (best(rounds[(way, n)]) for n in sizes)
        per_image = (large - small) / (sizes[1] - sizes[0])
        valid = per_image > 0  # noise can beat the per-image cost on tiny sizes (--quick)
        out[way] = {
            "seconds": [small, large],
            "fixed_seconds": small - per_image * sizes[0] if valid else None,
            "seconds_per_image": per_image if valid else None,
            "images_per_s": 1.0 / per_image if valid else None,
            "round_seconds": {str(n): rounds[(way, n)] for n in sizes},
        }
    return out


def course_size_speedup(args, course: dict, fast: dict, line: dict, n_train: int, n_val: int):
    """The frozen phase at the course's size (``REAL_RUN``'s images), from the measured rates.

    Course: each epoch a pass over the training images at the best measured epoch's rate,
    then one validation pass. Library: the feature pass's fixed cost plus its cost per image
    for train + val, then the head's epochs on cached rows and its evaluation, at the measured
    rates per row. For this benchmark's ``--epochs`` and the notebook's ``EPOCHS_FROZEN``.
    """
    r = REAL_RUN
    course_epoch_img = course["epoch_seconds_min"] / n_train
    course_eval_img = course["eval_seconds"] / n_val
    head_row_epoch = fast["head_seconds"] / (args.epochs * n_train)
    eval_row = fast["eval_seconds"] / n_val
    out = {"n_train": r["n_train"], "n_val": r["n_val"]}
    runs_ = (("benchmark_epochs", args.epochs), ("notebook_epochs", r["epochs_frozen"]))
    for label, epochs in runs_:
        c = epochs * r["n_train"] * course_epoch_img + r["n_val"] * course_eval_img
        head = epochs * r["n_train"] * head_row_epoch + r["n_val"] * eval_row
        row = {"epochs": epochs, "course_seconds": c}
        for way in ("one pass", "two loaders"):
            w = line[way]
            if w["seconds_per_image"] is None:
                row[way] = {"seconds": None, "speedup": None}
                continue
            f = w["fixed_seconds"] + (r["n_train"] + r["n_val"]) * w["seconds_per_image"] + head
            row[way] = {"seconds": f, "speedup": ratio(c, f)}
        out[label] = row
    return out


# =============================================================================================
# 2. Training DataLoader throughput
# =============================================================================================
def loader_rate(loader, device, max_images: int) -> dict:
    """Images/s from the first batch to the end (first batch excluded: start-up reported apart)."""
    t0 = time.perf_counter()
    t_first, seen = None, 0
    for x, y in loader:
        if device.type == "cuda":  # what the training loop does with it
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
        if t_first is None:
            t_first = time.perf_counter()
            continue
        seen += len(x)
        if seen >= max_images:
            break
    sync(device)
    t_end = time.perf_counter()
    return {
        "images_per_s": seen / max(t_end - t_first, 1e-9),
        "images_timed": seen,
        "first_batch_seconds": t_first - t0,
    }


def bench_loader(args, device, ds, train_idx) -> dict:
    from torchvision import transforms as T

    B = args.batch_size
    n = args.loader_images + B  # +1 batch: the excluded first one
    idx = np.resize(np.asarray(train_idx), n)  # repeat the images to the wanted count
    course_t = T.Compose(
        [
            T.Resize((args.img_size, args.img_size)),
            T.ToTensor(),
            T.Normalize(IMAGENET["mean"], IMAGENET["std"]),
        ]
    )
    course_ds = h.COCOTrainImageDataset(ds.img_dir, ds.annotations_dir, transform=course_t)
    course_loader = DataLoader(Subset(course_ds, idx.tolist()), batch_size=B, shuffle=True)
    pre = {**IMAGENET, "size": args.img_size}
    fast_set = data.LabelledSubset(ds, idx, transforms.build_transform(pre, train=True))
    fast_loader = transforms.make_loader(
        fast_set, B, True, device, config.device_choices(device)["workers"]
    )
    course_rounds, fast_rounds = [], []
    for _ in range(args.rounds):  # alternate; best round of each
        course_rounds.append(loader_rate(course_loader, device, args.loader_images))
        fast_rounds.append(loader_rate(fast_loader, device, args.loader_images))
    course = max(course_rounds, key=lambda r: r["images_per_s"])
    fast = max(fast_rounds, key=lambda r: r["images_per_s"])
    course["round_images_per_s"] = [r["images_per_s"] for r in course_rounds]
    fast["round_images_per_s"] = [r["images_per_s"] for r in fast_rounds]
    course.update(workers=0, transform="Resize((S, S)), ToTensor, Normalize", pin_memory=False)
    fast.update(
        workers=fast_loader.num_workers,
        pin_memory=fast_loader.pin_memory,
        transform="Resize, flip, TrivialAugmentWide, ToTensor, Normalize, RandomErasing",
    )
    del fast_loader  # ends persistent workers (CUDA)
    return {
        "batch_size": B,
        "img_size": args.img_size,
        "course": course,
        "fast": fast,
        "ratio": ratio(fast["images_per_s"], course["images_per_s"]),
    }


# =============================================================================================
# 3, 4. Fine-tuning and inference throughput per backbone
# =============================================================================================
def bench_backbone(name: str, args, device) -> tuple[dict, dict]:
    B, S, steps, rounds = args.ft_batch_size, args.img_size, args.steps, args.rounds
    pretrained = models.BACKBONES[name]["kind"] == "lite"  # the only weights available offline
    torch.manual_seed(args.seed)
    base, _ = models.build_model(name, pretrained=pretrained)
    init = copy.deepcopy(base.state_dict())
    gen = torch.Generator().manual_seed(args.seed)
    xs = [torch.randn(B, 3, S, S, generator=gen) for _ in range(steps)]
    ys = [(torch.rand(B, config.NUM_CLASSES, generator=gen) < 0.04).float() for _ in range(steps)]
    batches = [(x.to(device), y.to(device)) for x, y in zip(xs, ys)]
    criterion = nn.BCEWithLogitsLoss()
    amp_dtype, scaler = config.amp_settings(device)

    course_model = base.to(device)  # fp32, contiguous: the course's way
    course_opt = torch.optim.AdamW(course_model.parameters(), lr=1e-4)
    fast_model = copy.deepcopy(course_model).to(memory_format=torch.channels_last)
    fast_opt = training.make_optimizer(models.param_groups(fast_model, 1e-4, 0.1), device, 1e-4)

    def course_step(batches_):
        h.train_loop(batches_, course_model, criterion, course_opt, device)

    def fast_step(batches_):
        h.train_loop(
            batches_, fast_model, criterion, fast_opt, device, amp_dtype=amp_dtype, scaler=scaler
        )

    def timed(fn, data):
        sync(device)
        t0 = time.perf_counter()
        fn(data)
        sync(device)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        course_step(batches[:1])
        fast_step(batches[:1])
    t_course, t_fast = [], []
    for _ in range(rounds):  # alternate: load changes hit both sides
        t_course.append(timed(course_step, batches))
        t_fast.append(timed(fast_step, batches))
    n = B * steps
    ft = {
        "pretrained_weights": pretrained,
        "batch_size": B,
        "img_size": S,
        "steps_per_round": steps,
        "rounds": rounds,
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
        "course_images_per_s": n / best(t_course),
        "fast_images_per_s": n / best(t_fast),
        "course_round_seconds": t_course,
        "fast_round_seconds": t_fast,
    }
    ft["ratio"] = ratio(ft["fast_images_per_s"], ft["course_images_per_s"])
    course_opt = fast_opt = None  # frees the optimisers' state before the inference part

    # ---- inference: fresh weights (training on noise can leave denormals that slow a CPU)
    course_model.load_state_dict(init)
    fast_model.load_state_dict(init)
    course_model.eval()
    fast_model.eval()
    test_batches = [(x, y.cpu()) for x, y in batches]  # predict() returns targets as numpy

    @torch.no_grad()
    def course_infer(data, tta=False):
        for x, _ in data:
            p = torch.sigmoid(course_model(x))
            if tta:  # a second forward pass, as one writes it
                p = (p + torch.sigmoid(course_model(x.flip(-1)))) / 2
            p.cpu()

    def fast_infer(data, tta=False):
        training.predict(
            fast_model, data, device, tta_flip=tta, amp_dtype=amp_dtype, show_progress=False
        )

    variants = {
        "course": lambda d: course_infer(d),
        "course_tta": lambda d: course_infer(d, True),
        "fast": lambda d: fast_infer(d),
        "fast_tta": lambda d: fast_infer(d, True),
    }
    for fn in variants.values():
        for _ in range(args.warmup):
            fn(test_batches[:1])
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            times[k].append(timed(fn, test_batches))
    inf = {
        "batch_size": B,
        "img_size": S,
        "rounds": rounds,
        **{f"{k}_images_per_s": n / best(v) for k, v in times.items()},
        "round_seconds": times,
    }
    inf["ratio"] = ratio(inf["fast_images_per_s"], inf["course_images_per_s"])
    inf["ratio_tta"] = ratio(inf["fast_tta_images_per_s"], inf["course_tta_images_per_s"])
    return ft, inf


# =============================================================================================
# 6. 65,000 label files: the dataset and the split (measured in a subprocess)
# =============================================================================================
def write_label_files(folder: Path, n: int, seed: int) -> float:
    """``n`` ``.cls`` files with long-tailed labels (COCO-like), cached by a marker file."""
    marker = folder / ".labels_complete.json"
    params = {"n": n, "seed": seed, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == params:
        return 0.0
    t0 = time.perf_counter()
    labels_dir, images_dir = folder / "labels" / "train", folder / "images" / "train-resized"
    labels_dir.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)  # the dataset only checks that it exists
    for entry in os.scandir(labels_dir):
        os.remove(entry.path)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(600_000, size=n, replace=False) + 1)
    for image_id, classes in zip(ids, coco_like_labels(n, rng)):
        with open(labels_dir / f"{int(image_id):012d}.cls", "w") as fh:
            fh.write("".join(f"{c}\n" for c in classes))
    marker.write_text(json.dumps(params))
    return time.perf_counter() - t0


#: Class weights as COCO's spread them: after person (half the images), the commonest class in
#: about 10% of the images and the rarest in about 0.15% (hair drier: about 100 of 65,000).
COCO_TAIL = np.exp(-0.054 * np.arange(1, 80))


def coco_like_labels(n: int, rng: np.random.Generator, weights=None) -> list[list[int]]:
    """The classes of ``n`` images: person in about half of them, the other classes drawn
    with ``weights`` by rank (default 1/(rank + 12), a milder tail than :data:`COCO_TAIL`) in a
    random order, 0 to 6 labels (1% none)."""
    weights = 1.0 / (np.arange(1, config.NUM_CLASSES) + 12.0) if weights is None else weights
    prior = np.asarray(weights, dtype=float)[rng.permutation(config.NUM_CLASSES - 1)]
    prior /= prior.sum()
    k_all = rng.choice(7, size=n, p=[0.01, 0.22, 0.25, 0.21, 0.14, 0.10, 0.07])  # 1% unlabelled
    person = rng.random(n) < 0.5
    out = []
    for k, has_person in zip(k_all, person):
        classes = [0] if has_person and k else []
        m = int(k) - len(classes)
        if m > 0:
            classes += (
                rng.choice(config.NUM_CLASSES - 1, size=m, replace=False, p=prior) + 1
            ).tolist()
        out.append(classes)
    return out


def notebook_loaders(train_set, test_set, train_idx, val_idx, batch_size: int = 64) -> dict:
    """The five loaders challenge.ipynb's ``loaders_for`` builds for one backbone (train
    augmented, features, fit, val, test), on the ids of ``train_set``: nothing is decoded."""
    pre = models.preprocess_for(models.OFFLINE_BACKBONE, 224)
    eval_t = transforms.build_transform(pre, train=False)
    train_t = transforms.build_transform(pre, train=True)
    fit_idx = np.random.default_rng(0).choice(train_idx, len(val_idx), replace=False)
    make = lambda ds, train: transforms.make_loader(  # noqa: E731
        ds, batch_size if train else 2 * batch_size, train, "cpu", 2
    )
    part = lambda idx, t: data.LabelledSubset(train_set, idx, t)  # noqa: E731
    return {
        "train": make(part(train_idx, train_t), True),
        "features": make(part(train_idx, eval_t), False),
        "fit": make(part(fit_idx, eval_t), False),
        "val": make(part(val_idx, eval_t), False),
        "test": make(data.with_transform(test_set, eval_t), False),
    }


def labels_worker(folder: str, val_fraction: float, seed: int) -> int:
    """Run inside the subprocess: dataset + split, timed, with this process's own peak RSS."""
    baseline = rss_mb()  # interpreter + numpy + torch + helpers
    resettable = reset_peak_rss()
    root = Path(folder)
    t0 = time.perf_counter()
    ds = h.COCOTrainImageDataset(root / "images" / "train-resized", root / "labels" / "train")
    Y = data.labels_of(ds)
    t1 = time.perf_counter()
    train_idx, val_idx = split.stratified_split(Y, val_fraction, seed)
    t2 = time.perf_counter()
    test_set = h.COCOTestImageDataset.__new__(h.COCOTestImageDataset)  # the test folder's ids
    test_set.img_list = [f"{i:012d}.jpg" for i in range(1, budget.COURSE_SIZES["n_test"] + 1)]
    test_set.img_dir, test_set.transform = root / "images" / "test-resized", None
    loaders = notebook_loaders(ds, test_set, train_idx, val_idx)
    t3 = time.perf_counter()
    peak = peak_rss_mb()
    present = Y.sum(0) >= 2
    both = (Y[train_idx].sum(0) > 0) & (Y[val_idx].sum(0) > 0)
    print(
        json.dumps(
            {
                "n_files": len(ds),
                "dataset_seconds": t1 - t0,
                "split_seconds": t2 - t1,
                "seconds": t2 - t0,
                "loaders_seconds": t3 - t2,
                "loaders_rows": {k: len(v.dataset) for k, v in loaders.items()},
                "baseline_rss_mb": baseline,
                "peak_rss_mb": peak,
                "rss_increase_mb": peak - baseline if resettable else None,
                "peak_is_own": resettable,
                "n_train": len(train_idx),
                "n_val": len(val_idx),
                "classes_on_both_sides": int(both[present].sum()),
                "classes_with_2_plus": int(present.sum()),
                "label_matrix_mb": Y.nbytes / 2**20,
            }
        )
    )
    return 0


def bench_labels(args, workdir: Path) -> dict:
    folder = workdir / f"labels-{args.label_files}-seed{args.seed}"
    cached = (folder / ".labels_complete.json").exists()
    write_seconds = write_label_files(folder, args.label_files, args.seed)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--labels-worker",
        str(folder),
        "--seed",
        str(args.seed),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"label benchmark subprocess failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(
        write_seconds=write_seconds,
        files_cached=cached and write_seconds == 0.0,
        page_cache="warm (files just written or read)",
    )
    return res


# =============================================================================================
# 8. The analysis at the course's size (measured in a subprocess)
# =============================================================================================
def synthetic_run(n: int, n_nets: int = 3, seed: int = 0):
    """What ``analysis.RunArtifacts`` reads from a run folder, for ``n_nets`` networks on ``n``
    synthetic validation images: COCO-like labels, scores a little better per network, all
    sharing the images' difficulty (paired, as real networks are), flip-TTA scores, the best
    frozen head's, the course's recipe on each network's features; thresholds as the
    challenge notebook chooses them (not timed)."""
    from types import SimpleNamespace

    rng = np.random.default_rng(seed)
    Y = np.zeros((n, config.NUM_CLASSES), np.uint8)
    for i, classes in enumerate(coco_like_labels(n, rng, COCO_TAIL)):
        Y[i, classes] = 1
    hard = rng.normal(0, 0.8, Y.shape)  # what makes an image hard for every network

    def scores(skill):
        z = skill * (2.0 * Y - 1) - 2.5 + hard + rng.normal(0, 0.9, Y.shape)
        return (1 / (1 + np.exp(-z))).astype(np.float32)

    names = [f"net{i}" for i in range(n_nets)]
    run = SimpleNamespace(targets=Y, stems=[f"{i:012d}" for i in range(n)], names=names,
                          shrink=10.0, at_least_one=True, tta=True)  # fmt: skip
    run.val = {m: {"probs": scores(1.4 + 0.2 * i), "targets": Y} for i, m in enumerate(names)}
    for m in names:
        run.val[m]["probs_tta"] = np.clip(run.val[m]["probs"] + scores(0.1) * 0.1, 0, 1)
    run.probs = {m: run.val[m]["probs_tta"] for m in names}
    if n_nets > 1:
        run.probs["ensemble"] = np.mean([run.probs[m] for m in names], axis=0)
    run.models = list(run.probs)
    run.frozen_probs = {m: scores(1.2 + 0.2 * i) for i, m in enumerate(names)}
    seeds = range(1, config.OPTIONS.get("seeds", 3))  # the frozen heads of the other seeds
    run.seed_probs = {m: {0: run.frozen_probs[m], **{k: scores(1.2 + 0.2 * i) for k in seeds}}
                      for i, m in enumerate(names)}  # fmt: skip
    run.baselines = {m: {"probs": scores(0.9 + 0.2 * i)} for i, m in enumerate(names)}
    run.baseline = run.baselines[names[0]]
    run.results = {m: {"parameters": 4_000_000, "train_seconds": 600.0, "best_phase": "finetune",
                       "val_images_per_second": 100.0} for m in names}  # fmt: skip
    run.thresholds = {m: metrics.shrunk_thresholds(Y, p, run.shrink) for m, p in run.probs.items()}
    run.global_thresholds = {m: metrics.best_global_threshold(Y, p)[0]
                             for m, p in run.probs.items()}  # fmt: skip
    return run


def analysis_steps(run, n_boot: int, n_test: int) -> dict:
    """The analysis notebook's computations as it calls them, in its order (not its figures,
    nor the photos and Grad-CAM maps, which need a run folder's images), and the challenge
    notebook's expected test F1: ``{step: seconds}``."""
    from cocochallenge import analysis, compare

    seconds = {}

    def timed(step, fn):
        t0 = time.perf_counter()
        out = fn()
        seconds[step] = time.perf_counter() - t0
        return out

    y = run.targets
    timed("class_weights", lambda: analysis.class_weights(y))
    timed("study", lambda: analysis.study(run, n_boot))
    timed("seed_table", lambda: analysis.seed_table(run, n_boot))
    timed("frozen_against_finetuned", lambda: analysis.frozen_against_finetuned(run, n_boot))
    pairs = [(a, b) for i, a in enumerate(run.names) for b in run.names[i + 1 :]]
    timed("class_wins", lambda: [compare.class_wins(y, run.probs[a], run.probs[b], n=4)
                                 for a, b in pairs])  # fmt: skip
    counts = y.sum(0)
    timed("per_class_table", lambda: [metrics.per_class_table(y, run.probs[m], run.thresholds[m],
                                                              run.at_least_one, counts)
                                      for m in run.models])  # fmt: skip
    timed("threshold_sweep", lambda: [analysis.threshold_sweep(y, run.probs[m])
                                      for m in run.models])  # fmt: skip
    base = run.names[-1]
    timed("threshold_steps", lambda: analysis.threshold_steps(
        y, run.val[base]["probs"], run.val[base]["probs_tta"], run.probs.get("ensemble"),
        run.shrink, n_boot=n_boot))  # fmt: skip
    pred = metrics.apply_thresholds(run.probs[base], run.thresholds[base], run.at_least_one)
    timed("cooccurrence", lambda: [analysis.cooccurrence(m) for m in (y, y, pred)])
    timed("confusions", lambda: analysis.confusions(y, pred, analysis.cooccurrence(y)))
    last = run.models[-1]
    timed("expected_course_f1", lambda: compare.expected_course_f1(y, run.probs[last], n_test))
    return seconds


def analysis_worker(n: int, n_nets: int, n_boot: int, rounds: int, seed: int) -> int:
    """Run inside the subprocess: the paired comparison (best of ``rounds``), then the analysis
    notebook's computations once, each with its own peak RSS over this process's baseline."""
    from cocochallenge import compare

    baseline = rss_mb()
    run = synthetic_run(n, n_nets, seed)
    data_mb = rss_mb() - baseline
    comparison, peaks, resettable = [], {}, True
    for _ in range(max(1, rounds)):
        resettable &= reset_peak_rss()
        t0 = time.perf_counter()
        models_ = {m: {"preds": compare.cross_fitted(run.targets, run.probs[m], run.shrink,
                                                     run.at_least_one),
                       "probs": run.probs[m]} for m in run.names}  # fmt: skip
        t1 = time.perf_counter()
        compare.compare(run.targets, models_, n_boot, seed)
        comparison.append({"cross_fitted": t1 - t0, "compare": time.perf_counter() - t1})
        peaks["comparison"] = max(peaks.get("comparison", 0.0), peak_rss_mb())
    resettable &= reset_peak_rss()
    t0 = time.perf_counter()
    steps = analysis_steps(run, n_boot, budget.COURSE_SIZES["n_test"])
    total = time.perf_counter() - t0
    peaks["analysis"] = peak_rss_mb()
    fastest = min(comparison, key=lambda r: r["cross_fitted"] + r["compare"])
    print(json.dumps({
        "n_images": n, "n_networks": n_nets, "n_boot": n_boot, "rounds": len(comparison),
        "comparison_seconds": fastest["cross_fitted"] + fastest["compare"],
        "comparison_parts": fastest,
        "comparison_round_seconds": [r["cross_fitted"] + r["compare"] for r in comparison],
        "analysis_seconds": total, "analysis_steps": steps,
        "baseline_rss_mb": baseline, "scores_mb": data_mb,
        "comparison_peak_rss_mb": peaks["comparison"], "analysis_peak_rss_mb": peaks["analysis"],
        "peak_is_own": resettable,
    }))  # fmt: skip
    return 0


def bench_analysis(args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--analysis-worker",
           f"{args.analysis_images},{args.analysis_networks},{args.analysis_boot}",
           "--rounds", str(args.rounds), "--seed", str(args.seed)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"analysis benchmark subprocess failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["full_size"] = (res["n_images"] >= 6_500 and res["n_networks"] >= 3
                        and res["n_boot"] >= 1_000)  # fmt: skip
    return res


# =============================================================================================
# Projection of the notebook's default real run from the measured rates
# =============================================================================================
def project(finetune: dict, inference: dict, loader: dict | None) -> dict:
    """Wall time of the notebook's default run from the measured images/s (fast and course way).

    Frozen phase: features of train + val once (fast) or ``epochs_frozen`` passes over the
    training images plus a validation pass per epoch (course). Fine-tuning: each epoch over the
    training images at the slower of the training step and the loader, plus a validation pass.
    Last, validation and test predictions (with flip TTA on the fast side). Head epochs on
    cached features and checkpoint writes are left out (seconds). The fast side is
    ``budget.run_seconds`` at the measured rates, without the EMA's second validation pass.
    """
    r = REAL_RUN
    cap = loader["fast"]["images_per_s"] if loader else float("inf")
    cap_course = loader["course"]["images_per_s"] if loader else float("inf")
    per = {}
    for name in finetune:
        ft, inf = finetune[name], inference[name]
        fast_inf, fast_tta = (
            min(inf["fast_images_per_s"], cap),
            min(inf["fast_tta_images_per_s"], cap),
        )
        fast_ft = min(ft["fast_images_per_s"], cap)
        c_inf, c_ft = (
            min(inf["course_images_per_s"], cap_course),
            min(ft["course_images_per_s"], cap_course),
        )
        c_frozen_step = min(inf["course_images_per_s"], cap_course)  # frozen backbone: forward only
        epochs = 0 if name in config.OPTIONS["frozen_only"] else r["epochs_finetune"]
        fast_s = budget.run_seconds(
            {"train": fast_ft, "forward": fast_inf, "tta": fast_tta},
            r["n_train"],
            r["n_val"],
            r["n_test"],
            epochs,
            ema=False,
        )
        course_s = (
            r["epochs_frozen"] * (r["n_train"] / c_frozen_step + r["n_val"] / c_inf)
            + epochs * (r["n_train"] / c_ft + r["n_val"] / c_inf)
            + (r["n_val"] + r["n_test"]) / c_inf
        )
        per[name] = {
            "fast_hours": fast_s / 3600,
            "course_hours": course_s / 3600,
            "finetune_bottleneck": "loader" if ft["fast_images_per_s"] > cap else "compute",
        }
    complete = all(b in per for b in r["backbones"])
    total = lambda key: sum(per[b][key] for b in r["backbones"]) if complete else None  # noqa: E731
    return {
        "run": r,
        "per_backbone": per,
        "fast_hours": total("fast_hours"),
        "course_hours": total("course_hours"),
        "complete": complete,
    }


# =============================================================================================
# Output
# =============================================================================================
def fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "PASS" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def print_table(res: dict) -> None:
    dev, s = res["device"], res["settings"]
    lines = [
        f"Benchmark (issue 5) on {dev['type']}: {dev['name']}; torch {dev['torch']}, "
        f"{dev['threads']} threads, {dev['cpu_count']} CPUs; load average at start "
        f"{dev['loadavg_start']}, at end {dev['loadavg_end']}"
    ]
    fr = res.get("frozen")
    if fr:
        c, f = fr["course"], fr["fast"]
        ext = (
            f"extrapolated from {c['epochs_measured']} measured epochs"
            if c["extrapolated"]
            else f"all {fr['epochs']} epochs measured"
        )
        lines += [
            "",
            f"1. Frozen phase: {fr['backbone']} (ImageNet weights), {fr['n_train']} train / "
            f"{fr['n_val']} val images, {fr['epochs']} epochs, {fr['img_size']} px, batch "
            f"{fr['batch_size']}, AdamW lr {fr['lr_head']}; same head init, batch order and "
            "dropout",
            f"   {'':34}{'best s':>9}{'wall s':>9}{'val mAP':>9}  detail (mAP after "
            f"{c['epochs_measured']} epochs on both sides)",
            f"   {'course: train_loop on images':34}{fmt(c['seconds']):>9}"
            f"{fmt(c['seconds_wall']):>9}"
            f"{fmt(c['val_mAP'], 4):>9}  {fmt(c['epoch_seconds_min'], 2)} s/epoch best, "
            f"{fmt(c['epoch_seconds_mean'], 2)} mean, {fmt(c['epoch_seconds_max'], 2)} worst; "
            f"{ext}; eval {fmt(c['eval_seconds'], 2)} s",
            f"   {'library: cached features + head':34}{fmt(f['seconds']):>9}"
            f"{fmt(f['seconds_wall']):>9}{fmt(f['val_mAP_at_course_epochs'], 4):>9}  "
            f"best of {f['repeats']} runs between course "
            f"epochs: features {fmt(f['feature_seconds'], 2)} s ({f['loader_workers']} workers), "
            f"head {fmt(f['head_seconds'], 2)} s, eval {fmt(f['eval_seconds'], 3)} s; "
            f"{fr['feature_dtype']} cache",
            f"   speedup {fmt(fr['speedup'])}x best-of, {fmt(fr['speedup_wall'])}x wall (target >= "
            f"{TARGETS['frozen_speedup']:.0f}x); |mAP difference| {fmt(fr['mAP_diff'], 4)} "
            "(target <= "
            f"{TARGETS['frozen_map_diff']})"
            + (
                f"; library mAP after all {fr['epochs']} epochs {fmt(f['val_mAP'], 4)}"
                if c["extrapolated"]
                else ""
            ),
        ]
        ln, cs = fr["feature_line"], fr["course_size"]
        ms = lambda v: None if v is None else v * 1000  # noqa: E731
        minutes = lambda v: None if v is None else v / 60  # noqa: E731
        way = lambda w: (f"{w}: {fmt(ln[w]['fixed_seconds'], 2)} s fixed + "  # noqa: E731
                         f"{fmt(ms(ln[w]['seconds_per_image']), 2)} ms/image")  # fmt: skip
        lines.append(
            f"   feature pass of train + val, loaders started included (best of "
            f"{len(ln['one pass']['round_seconds'][str(ln['sizes'][0])])} at "
            f"{' and '.join(map(str, ln['sizes']))} images): {way('one pass')}; "
            f"{way('two loaders')}"
        )
        for key in ("benchmark_epochs", "notebook_epochs"):
            row = cs[key]
            lines.append(
                f"   at the course's size ({cs['n_train']:,} + {cs['n_val']:,} images, "
                f"{row['epochs']} epochs{', the notebook' if key == 'notebook_epochs' else ''}): "
                f"course {fmt(row['course_seconds'] / 60)} min, library "
                f"{fmt(minutes(row['one pass']['seconds']))} min: speedup "
                f"{fmt(row['one pass']['speedup'])}x (with two loaders "
                f"{fmt(row['two loaders']['speedup'])}x)"
            )
    lo = res.get("loader")
    if lo:
        c, f = lo["course"], lo["fast"]
        lines += [
            "",
            f"2. Training DataLoader, {lo['img_size']} px, batch {lo['batch_size']} "
            f"(images/s after the first batch; decode + transform + collate)",
            f"   best of {len(c['round_images_per_s'])} alternating rounds",
            f"   {'course: DataLoader(ds, B, shuffle=True)':48}{fmt(c['images_per_s']):>10} img/s  "
            f"0 workers, {c['transform']}",
            f"   {'library: make_loader':48}{fmt(f['images_per_s']):>10} img/s  "
            f"{f['workers']} workers, {f['transform']} "
            f"(first batch {fmt(f['first_batch_seconds'], 2)} s)",
            f"   ratio {fmt(lo['ratio'], 2)}x (the library's transform does more work per image)",
        ]
    ft, inf = res.get("finetune"), res.get("inference")
    if ft:
        lines += [
            "",
            f"3. Fine-tuning throughput (random tensors, {s['img_size']} px, batch "
            f"{s['ft_batch_size']}, best of {s['rounds']} alternating rounds x {s['steps']} "
            "steps), images/s",
            f"   {'backbone':22}{'weights':>10}{'course fp32':>13}{'library':>10}{'ratio':>8}  "
            "library way",
        ]
        for name, v in ft.items():
            lines.append(
                f"   {name:22}{'ImageNet' if v['pretrained_weights'] else 'random':>10}"
                f"{fmt(v['course_images_per_s']):>13}{fmt(v['fast_images_per_s']):>10}"
                f"{fmt(v['ratio'], 2):>8}  channels-last, autocast {v['amp_dtype'] or 'off'}, "
                f"{'fused ' if dev['type'] == 'cuda' else ''}AdamW, no per-batch .item()"
            )
        lines.append(
            "   (torchvision backbones are built without weights: no download here; "
            "throughput does not depend on the weights)"
        )
    if inf:
        lines += [
            "",
            "4. Inference throughput (images/s counted in original images)",
            f"   {'backbone':22}{'course':>10}{'library':>10}{'ratio':>8}{'course TTA':>12}"
            f"{'library TTA':>13}{'ratio':>8}",
        ]
        for name, v in inf.items():
            lines.append(
                f"   {name:22}{fmt(v['course_images_per_s']):>10}{fmt(v['fast_images_per_s']):>10}"
                f"{fmt(v['ratio'], 2):>8}{fmt(v['course_tta_images_per_s']):>12}"
                f"{fmt(v['fast_tta_images_per_s']):>13}{fmt(v['ratio_tta'], 2):>8}"
            )
        lines.append(
            "   course TTA = two forward passes; library TTA = predict(): one stacked batch on "
            "CUDA, two calls on a CPU"
        )
    mem = res["memory"]
    lines += [
        "",
        "5. Peak memory per part (main process RSS; DataLoader workers not included)",
        f"   {'part':12}{'seconds':>10}{'peak RSS MB':>13}{'CUDA max MB':>13}",
    ]
    for name, v in mem["sections"].items():
        lines.append(
            f"   {name:12}{fmt(v['seconds']):>10}{fmt(v['peak_rss_mb'], 0):>13}"
            f"{fmt(v['cuda_max_allocated_mb'], 0):>13}"
        )
    lines.append(f"   whole process: peak RSS {fmt(mem['process_peak_rss_mb'], 0)} MB")
    lb = res.get("labels")
    if lb:
        rows = ", ".join(f"{k} {v:,}" for k, v in lb["loaders_rows"].items())
        written = (
            "cached" if lb["files_cached"] else "written in {:.1f} s".format(lb["write_seconds"])
        )
        lines += [
            "",
            f"6. Dataset + split from {lb['n_files']:,} label files (subprocess; files {written})",
            f"   COCOTrainImageDataset {fmt(lb['dataset_seconds'], 2)} s + stratified_split "
            f"{fmt(lb['split_seconds'], 2)} s = {fmt(lb['seconds'], 2)} s (target < "
            f"{TARGETS['labels_seconds']:.0f} s); peak RSS {fmt(lb['peak_rss_mb'], 0)} MB, "
            f"{fmt(lb['rss_increase_mb'], 0)} MB over the {fmt(lb['baseline_rss_mb'], 0)} MB of "
            f"interpreter + imports (target < {TARGETS['labels_mb']:.0f} MB)",
            f"   split {lb['n_train']:,} / {lb['n_val']:,}; {lb['classes_on_both_sides']} of "
            f"{lb['classes_with_2_plus']} classes (>= 2 images) on both sides",
            f"   the notebook's 5 loaders on these ids ({rows}): "
            f"{fmt(lb['loaders_seconds'], 2)} s to build",
        ]
    al = res.get("allocator")
    if al:
        lines += [
            "",
            "7. The allocator on both paths (Lite0, fresh processes, best of rounds; finished "
            "loader workers counted): the CPU recipe's features of "
            f"{al['n_feature_images']} images at {al['feature_size']} px (no loader workers); the "
            f"notebook's fine-tuning epoch of {al['n_train_images']} and validation of "
            f"{al['n_val_images']} at {al['img_size']} px ({al['workers']} loader workers)",
            f"   {'':36}{'wall s':>8}{'user s':>8}{'sys s':>8}{'sys/user':>10}{'minor faults':>14}",
        ]
        for mode, label in (("default", "glibc's default"), ("keep", "mallopt (keep_freed)"),
                            ("env", "GLIBC_TUNABLES (run.py)")):  # fmt: skip
            for path in ALLOCATOR_PATHS:
                v = al[mode][path]
                lines.append(
                    f"   {label + ', ' + path.replace('_', ' '):36}{fmt(v['wall']):>8}"
                    f"{fmt(v['user']):>8}{fmt(v['sys']):>8}"
                    f"{v['sys'] / max(v['user'], 1e-9):>10.0%}{v['minor_faults']:>14,}"
                )
        lines.append("   speed-up over the default: " + ", ".join(
            f"{k.replace('_', ' ')} {fmt(v, 2)}x" for k, v in al["speedup"].items()))  # fmt: skip
    an = res.get("analysis")
    if an:
        steps = ", ".join(f"{k} {fmt(v)}" for k, v in an["analysis_steps"].items())
        parts = an["comparison_parts"]
        lines += [
            "",
            f"8. The analysis on synthetic scores: {an['n_images']:,} validation images x 80 "
            f"classes, {an['n_networks']} networks, {an['n_boot']:,} resamples (subprocess)",
            f"   paired comparison (cross_fitted + compare): {fmt(an['comparison_seconds'])} s "
            f"(best of {an['rounds']}: {fmt(parts['cross_fitted'])} + {fmt(parts['compare'])}; "
            f"target <= 20 s); peak RSS {fmt(an['comparison_peak_rss_mb'], 0)} MB",
            f"   the analysis notebook's computations: {fmt(an['analysis_seconds'])} s (target "
            f"<= 180 s); peak RSS {fmt(an['analysis_peak_rss_mb'], 0)} MB, over the "
            f"{fmt(an['baseline_rss_mb'], 0)} MB of interpreter + imports",
            f"   seconds per step: {steps}",
        ]
    pr = res.get("projection")
    if pr:
        r = pr["run"]
        lines += [
            "",
            f"Projection of the notebook's default run on this device ({r['n_train']:,} train, "
            f"{r['n_val']:,} val, {r['n_test']:,} test images; {r['epochs_frozen']} frozen + "
            f"{r['epochs_finetune']} fine-tuning epochs), hours",
        ]
        for name, v in pr["per_backbone"].items():
            lines.append(
                f"   {name:22} library {fmt(v['fast_hours'], 2):>8}   course way "
                f"{fmt(v['course_hours'], 2):>8}   fine-tuning bound by {v['finetune_bottleneck']}"
            )
        lines.append(
            f"   notebook default backbones {', '.join(r['backbones'])}: library "
            f"{fmt(pr['fast_hours'], 2)} h, course way {fmt(pr['course_hours'], 2)} h"
            + ("" if pr["complete"] else " (not all of them measured in this run)")
        )
    lines += ["", "Targets"]
    for key, value in res["targets"].items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {fmt(v)}" for k, v in value.items())
        lines.append(f"   {key:44}{fmt(value)}")
    for note in res["notes"]:
        lines.append(f"   note: {note}")
    print("\n".join(lines))


# =============================================================================================
# Main
# =============================================================================================
# =============================================================================================
# 7. The allocator on both paths: glibc's default against keeping freed memory
# =============================================================================================
#: The CPU recipe's larger input size (cpu_recipe.MEMBERS): its costliest feature sets.
RECIPE_SIZE = 384
#: The two paths of part 7: run.py's CPU recipe, and the challenge notebook's training.
ALLOCATOR_PATHS = ("cpu_recipe", "notebook")


def allocator_probe(mode: str, sizes: tuple, seed: int) -> int:
    """Run inside a subprocess: each path's work on random images, with its wall, user and
    system seconds and minor page faults (this process and its finished loader workers): the
    CPU recipe's feature pass (``extract_features`` over batches of 32, no loader workers, as
    ``cpu_recipe.run``) and the notebook's training (a fine-tuning epoch of batches of 32 and
    its validation, through ``make_loader`` with the workers ``config.device_choices`` gives a
    CPU). ``mode``: glibc's default, ``keep`` (mallopt in this process) or ``env``
    (``GLIBC_TUNABLES`` set before the process started, as run.py does)."""
    from torch.utils.data import TensorDataset

    n_features, feature_size, n_train, n_val, size = sizes
    note = config.keep_freed_memory() if mode == "keep" else f"allocator: {mode}"
    cpu = torch.device("cpu")
    workers = config.device_choices(cpu)["workers"]
    torch.manual_seed(seed)
    model, _ = models.build_model("efficientnet_lite0", pretrained=False)
    gen = torch.Generator().manual_seed(seed)

    def images(n, px):
        x = torch.randn(n, 3, px, px, generator=gen)
        return TensorDataset(x, (torch.rand(n, config.NUM_CLASSES, generator=gen) < 0.04).float())

    recipe_set, train_set, val_set = (images(n_features, feature_size), images(n_train, size),
                                      images(n_val, size))  # fmt: skip
    criterion = nn.BCEWithLogitsLoss()
    groups = models.param_groups(model, 1e-4, 0.1)
    optimizer = training.make_optimizer(groups, cpu, 1e-4)
    h.train_loop([train_set[:32]], model, criterion, optimizer, "cpu")  # warm-up: not timed
    with torch.inference_mode():
        model.backbone.eval()(recipe_set[:32][0])

    def usage():  # this process and its finished children (the loader workers)
        return [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]

    def timed(fn):
        r0, t0 = usage(), time.perf_counter()
        fn()
        r1, wall = usage(), time.perf_counter() - t0
        diff = lambda key: sum(getattr(b, key) - getattr(a, key) for a, b in zip(r0, r1))  # noqa: E731
        return {"wall": wall, "user": diff("ru_utime"), "sys": diff("ru_stime"),
                "minor_faults": diff("ru_minflt")}  # fmt: skip

    def recipe():
        loader = transforms.make_loader(recipe_set, 32, False, cpu, workers=0)
        training.extract_features(model.backbone, loader, cpu, show_progress=False)

    def notebook():
        h.train_loop(transforms.make_loader(train_set, 32, True, cpu, workers), model,
                     criterion, optimizer, "cpu")  # fmt: skip
        training.predict(model, transforms.make_loader(val_set, 64, False, cpu, workers), cpu,
                         show_progress=False)  # fmt: skip

    print(json.dumps({"mode": mode, "note": note, "workers": workers, "cpu_recipe": timed(recipe),
                      "notebook": timed(notebook)}))  # fmt: skip
    return 0


def bench_allocator(args) -> dict:
    """Each mode in fresh processes (the setting acts on a whole process), in alternation."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    feature_size = args.img_size if args.quick else RECIPE_SIZE
    sizes = (32, feature_size, 32, 16, args.img_size) if args.quick else (
        160, feature_size, 256, 64, args.img_size)  # fmt: skip
    import run  # the setting run.py starts itself with

    runs = {"default": [], "keep": [], "env": []}
    for _ in range(max(1, args.rounds - 1)):
        for mode in runs:
            cmd = [sys.executable, str(ROOT / "benchmark.py"), "--allocator-probe", mode, "--seed",
                   str(args.seed), "--probe-sizes", ",".join(map(str, sizes))]  # fmt: skip
            mode_env = {**env, "GLIBC_TUNABLES": run.TUNABLES} if mode == "env" else env
            out = subprocess.run(cmd, env=mode_env, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    res = dict(zip(("n_feature_images", "feature_size", "n_train_images", "n_val_images",
                    "img_size"), sizes), workers=runs["env"][0]["workers"])  # fmt: skip
    for mode, rounds in runs.items():
        res[mode] = {path: min((r[path] for r in rounds), key=lambda x: x["wall"])
                     for path in ALLOCATOR_PATHS}  # fmt: skip
        res[mode]["note"] = rounds[0]["note"]
    wall = lambda mode, path: res[mode][path]["wall"]  # noqa: E731
    res["speedup"] = {f"{mode} {path}": ratio(wall("default", path), wall(mode, path))
                      for mode in ("keep", "env") for path in ALLOCATOR_PATHS}  # fmt: skip
    return res


QUICK = {
    "n_images": 32,
    "n_val": 16,
    "epochs": 2,
    "course_epochs": 0,
    "frozen_img_size": 64,
    "batch_size": 16,
    "img_size": 64,
    "ft_batch_size": 4,
    "steps": 1,
    "rounds": 1,
    "warmup": 1,
    "loader_images": 64,
    "label_files": 2000,
    "backbones": "efficientnet_lite0",
    "analysis_images": 600,
    "analysis_boot": 100,
}
DEFAULTS = {
    "epochs": 20,
    "course_epochs": 0,
    "frozen_img_size": 128,
    "batch_size": 64,
    "img_size": 224,
    "label_files": 65_000,
    "analysis_images": 6_500,
    "analysis_boot": 1_000,
}
DEVICE_DEFAULTS = {  # cpu, cuda
    "n_images": (400, 2000),
    "n_val": (100, 500),
    "ft_batch_size": (16, 64),
    "steps": (2, 20),
    "rounds": (3, 3),
    "warmup": (1, 5),
    "loader_images": (640, 4096),
    "backbones": (
        "efficientnet_lite0,mobilenet_v3_large",
        "maxvit_t,convnext_tiny_in22k,mobilenet_v3_large,efficientnet_lite0",
    ),
}
SECTIONS = ("frozen", "loader", "finetune", "labels", "allocator", "analysis")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument(
        "--n-images",
        type=int,
        help="training images of the frozen phase (CPU 400, CUDA 2000; quick 32)",
    )
    p.add_argument(
        "--n-val",
        type=int,
        help="validation images of the frozen phase (CPU 100, CUDA 500; quick 16)",
    )
    p.add_argument("--epochs", type=int, help="frozen-phase epochs (20; quick 3)")
    p.add_argument(
        "--course-epochs",
        type=int,
        help="course epochs actually run, the rest extrapolated linearly and labelled so "
        "(default 0: all --epochs; 3 saves about 80%% of part 1 on a busy machine)",
    )
    p.add_argument(
        "--frozen-img-size", type=int, help="image size of the frozen phase (128; quick 64)"
    )
    p.add_argument("--frozen-backbone", default=models.OFFLINE_BACKBONE)
    p.add_argument("--lr-head", type=float, default=1e-3)
    p.add_argument(
        "--batch-size", type=int, help="frozen phase and loader batch size (64; quick 16)"
    )
    p.add_argument(
        "--img-size", type=int, help="loader, fine-tuning, inference size (224; quick 64)"
    )
    p.add_argument(
        "--backbones",
        help="comma-separated registry names "
        "(CPU: efficientnet_lite0,mobilenet_v3_large; CUDA: adds maxvit_t, convnext_tiny_in22k)",
    )
    p.add_argument(
        "--ft-batch-size", type=int, help="fine-tuning/inference batch (CPU 16, CUDA 64)"
    )
    p.add_argument("--steps", type=int, help="timed steps per round (CPU 2, CUDA 20)")
    p.add_argument(
        "--rounds",
        type=int,
        help="alternating rounds per measurement, the best is kept "
        "(3); also the library frozen-phase repetitions",
    )
    p.add_argument("--warmup", type=int, help="warm-up steps (CPU 1, CUDA 5)")
    p.add_argument("--loader-images", type=int, help="images timed per loader (CPU 640, CUDA 4096)")
    p.add_argument("--label-files", type=int, help="label files of part 6 (65000; quick 2000)")
    p.add_argument(
        "--analysis-images",
        type=int,
        help="validation images of part 8's synthetic scores (6500; quick 600)",
    )
    p.add_argument("--analysis-networks", type=int, default=3, help="networks of part 8 (3)")
    p.add_argument(
        "--analysis-boot",
        type=int,
        help="bootstrap resamples of part 8 (1000, the notebook's; quick 100)",
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"parts to run, comma-separated from {','.join(SECTIONS)} "
        "(finetune includes inference)",
    )
    p.add_argument(
        "--data-dir", help="keep generated data here between runs (default: a temp folder)"
    )
    p.add_argument("--json", help="also write the JSON object to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: under a minute on a CPU")
    p.add_argument("--labels-worker", help=argparse.SUPPRESS)
    p.add_argument("--analysis-worker", help=argparse.SUPPRESS)
    p.add_argument("--allocator-probe", choices=("default", "keep", "env"), help=argparse.SUPPRESS)
    p.add_argument("--probe-sizes", help=argparse.SUPPRESS)
    p.add_argument("--keep-freed-memory", default="yes", choices=("yes", "no"),
                   help="keep freed memory for reuse in this process (config.keep_freed_memory; "
                   "'no' to measure without)")  # fmt: skip
    args = p.parse_args(argv)
    if args.labels_worker or args.allocator_probe or args.analysis_worker:
        return args
    args.device = config.pick_device(args.device)
    cuda = args.device.type == "cuda"
    for key, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key, (cpu_v, cuda_v) in DEVICE_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, cuda_v if cuda else cpu_v)
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    for b in args.backbones:
        if b not in models.BACKBONES:
            p.error(f"unknown backbone {b!r}; choose from {', '.join(models.BACKBONES)}")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in args.sections:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
    return args


def device_info(device: torch.device) -> dict:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            models_ = [
                line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")
            ]
            name = models_[0] if models_ else name
    except OSError:
        pass
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    return {
        "type": device.type,
        "name": name,
        "torch": torch.__version__,
        "torchvision": __import__("torchvision").__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": _loadavg(),
    }


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run(args) -> dict:
    device = args.device
    t_start = time.perf_counter()
    res = {
        "benchmark": "issue-5",
        "version": 1,
        "device": device_info(device),
        "settings": {
            k: (str(v) if isinstance(v, torch.device) else v)
            for k, v in vars(args).items()
            if k not in ("labels_worker", "json")
        },
        "frozen": None,
        "loader": None,
        "finetune": None,
        "inference": None,
        "labels": None,
        "allocator": None,
        "analysis": None,
        "projection": None,
    }
    memory = {}
    notes = [
        "torchvision backbones are built with pretrained=False (no download here); "
        "throughput does not depend on the weights; efficientnet_lite0 uses its offline weights"
    ]
    tmp = None
    if args.data_dir:
        workdir = Path(args.data_dir).expanduser().resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="coco-benchmark-")
        workdir = Path(tmp.name)
    try:
        if {"frozen", "loader"} & set(args.sections):
            n_total = args.n_images + args.n_val
            root = workdir / f"demo-{n_total}-seed{args.seed}" / "ms-coco"
            demo.make_demo_data(root, n_train=n_total, n_test=4, seed=args.seed, progress=False)
            paths = data.data_paths(root)
            ds = h.COCOTrainImageDataset(paths["train_images"], paths["train_labels"])
            Y = data.labels_of(ds)
            train_idx, val_idx = split.stratified_split(Y, args.n_val / n_total, args.seed)
        if "frozen" in args.sections:
            with Section("frozen", device, memory):
                res["frozen"] = bench_frozen(args, device, ds, Y, train_idx, val_idx)
            if res["frozen"]["course"]["extrapolated"]:
                notes.append(
                    f"course frozen-phase time extrapolated linearly from "
                    f"{res['frozen']['course']['epochs_measured']} of {args.epochs} epochs "
                    "(--course-epochs 0 runs them all); its mAP is compared with the library's "
                    "after as many epochs"
                )
        if "loader" in args.sections:
            with Section("loader", device, memory):
                res["loader"] = bench_loader(args, device, ds, train_idx)
        if "finetune" in args.sections:
            res["finetune"], res["inference"] = {}, {}
            for name in args.backbones:
                with Section(f"finetune:{name}", device, memory):
                    res["finetune"][name], res["inference"][name] = bench_backbone(
                        name, args, device
                    )
            res["projection"] = project(res["finetune"], res["inference"], res["loader"])
        if "labels" in args.sections:
            with Section("labels", device, memory):
                res["labels"] = bench_labels(args, workdir)
            memory["labels"]["subprocess_peak_rss_mb"] = res["labels"]["peak_rss_mb"]
        if "allocator" in args.sections and device.type == "cpu":
            res["allocator"] = bench_allocator(args)
        if "analysis" in args.sections:
            with Section("analysis", device, memory):
                res["analysis"] = bench_analysis(args)
            memory["analysis"]["subprocess_peak_rss_mb"] = max(
                res["analysis"]["comparison_peak_rss_mb"], res["analysis"]["analysis_peak_rss_mb"]
            )
    finally:
        if tmp is not None:
            tmp.cleanup()
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # reset with the sections' marks
    ru_mb = ru / 2**20 if sys.platform == "darwin" else ru / 1024
    res["memory"] = {
        "sections": memory,
        "process_peak_rss_mb": max([ru_mb] + [v["peak_rss_mb"] for v in memory.values()]),
        "cuda_max_allocated_mb": (
            max((v["cuda_max_allocated_mb"] or 0) for v in memory.values())
            if device.type == "cuda" and memory
            else None
        ),
    }
    res["targets"] = targets(res, device)
    res["device"]["loadavg_end"] = _loadavg()
    res["total_seconds"] = time.perf_counter() - t_start
    if res["device"]["loadavg_start"] and res["device"]["loadavg_start"][0] > 1.5 * (
        os.cpu_count() or 1
    ):
        notes.append(
            "the machine was busy (load average above the CPU count): absolute rates are low "
            "and vary; the best-of figures, measured in alternation, are the robust ones"
        )
    res["notes"] = notes
    return res


def targets(res: dict, device: torch.device) -> dict:
    t = {}
    fr, lb, ft, lo = res["frozen"], res["labels"], res["finetune"], res["loader"]
    t["frozen_speedup_at_least_10x"] = (
        bool(fr["speedup"] >= TARGETS["frozen_speedup"]) if fr else None
    )
    t["frozen_mAP_within_0.01"] = bool(fr["mAP_diff"] <= TARGETS["frozen_map_diff"]) if fr else None
    t["labels_under_15s"] = bool(lb["seconds"] < TARGETS["labels_seconds"]) if lb else None
    t["labels_under_200MB"] = (
        bool(lb["rss_increase_mb"] < TARGETS["labels_mb"])
        if lb and lb["rss_increase_mb"] is not None
        else None
    )
    t["labels_full_size"] = bool(lb["n_files"] >= 65_000) if lb else None
    an = res["analysis"]
    t["comparison_under_20s"] = bool(an["comparison_seconds"] <= 20) if an else None
    t["analysis_under_180s"] = bool(an["analysis_seconds"] <= 180) if an else None
    t["analysis_full_size"] = an["full_size"] if an else None
    t["finetune_library_faster"] = {k: bool(v["ratio"] > 1) for k, v in ft.items()} if ft else None
    t["inference_library_faster"] = (
        {k: bool(v["ratio"] > 1) for k, v in res["inference"].items()} if res["inference"] else None
    )
    gpu = device.type == "cuda"
    measured = [b for b in GPU_TARGET_BACKBONES if ft and b in ft]
    t["gpu_finetune_at_least_2x"] = (
        bool(all(ft[b]["ratio"] >= TARGETS["gpu_finetune_speedup"] for b in measured))
        if gpu and measured
        else None
    )
    t["gpu_loader_not_bottleneck"] = (
        {k: bool(lo["fast"]["images_per_s"] >= v["fast_images_per_s"]) for k, v in ft.items()}
        if gpu and ft and lo
        else None
    )
    return t


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.labels_worker:
        return labels_worker(args.labels_worker, 0.1, args.seed)
    if args.analysis_worker:
        n, nets, boot = (int(v) for v in args.analysis_worker.split(","))
        return analysis_worker(n, nets, boot, args.rounds or 1, args.seed)
    if args.allocator_probe:
        sizes = tuple(int(v) for v in args.probe_sizes.split(","))
        return allocator_probe(args.allocator_probe, sizes, args.seed)
    if args.keep_freed_memory == "yes":
        print(config.keep_freed_memory(), flush=True)
    res = run(args)
    print_table(res)
    line = json.dumps(res, default=files._json_default)
    if args.json:
        files.save_json(res, args.json)
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
