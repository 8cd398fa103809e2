"""Speed and memory benchmark of the library against the course's way.

    python benchmark.py                     # default: ~4 min on an idle 2-core CPU, ~10 when busy
    python benchmark.py --quick             # tiny sizes, under a minute (tests/test_benchmark.py)
    python benchmark.py --course-epochs 3   # time 3 course epochs of 20, extrapolate (busy machine)
    python benchmark.py --device cuda       # on a GPU: adds convnext_tiny and efficientnet_v2_s
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
   library's training transform (flip, TrivialAugment, erasing) and workers;
3. fine-tuning throughput per backbone on random tensors (compute only): the course's
   ``train_loop`` as the course calls it (fp32, contiguous, plain AdamW), against the same loop
   on a channels-last model with ``amp_settings`` autocast (none on the CPU) and
   ``make_optimizer`` (fused AdamW on CUDA);
4. test inference throughput, without and with flip TTA (``predict``);
5. peak memory of each part (process RSS; CUDA max allocated on a GPU);
6. building the training dataset and the split from ``--label-files`` generated ``.cls`` files,
   in a subprocess so that its peak RSS is its own;
7. on a CPU, glibc's default allocator against ``config.keep_freed_memory`` (which this process
   uses unless ``--keep-freed-memory no``): wall, user and system seconds and minor page
   faults of feature extraction and of a fine-tuning epoch, each in fresh processes.

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
    "backbones": ["convnext_tiny", "efficientnet_v2_s", "mobilenet_v3_large"],
    "epochs_frozen": 6,
    "epochs_finetune": 8,
    **budget.COURSE_SIZES,
}
GPU_TARGET_BACKBONES = ("convnext_tiny", "efficientnet_v2_s")
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
        f_train = training.extract_features(fast_model.backbone, train_loader, device, **fkw)
        f_val = training.extract_features(
            fast_model.backbone, transforms.make_loader(val_set, B, False, device), device, **fkw
        )
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
    }


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
    prior = 1.0 / (np.arange(1, config.NUM_CLASSES) + 12.0)
    prior = prior[rng.permutation(config.NUM_CLASSES - 1)]
    prior /= prior.sum()
    k_all = rng.choice(7, size=n, p=[0.01, 0.22, 0.25, 0.21, 0.14, 0.10, 0.07])  # 1% unlabelled
    person = rng.random(n) < 0.5
    for image_id, k, has_person in zip(ids, k_all, person):
        classes = [0] if has_person and k else []
        m = int(k) - len(classes)
        if m > 0:
            classes += (
                rng.choice(config.NUM_CLASSES - 1, size=m, replace=False, p=prior) + 1
            ).tolist()
        with open(labels_dir / f"{int(image_id):012d}.cls", "w") as fh:
            fh.write("".join(f"{c}\n" for c in classes))
    marker.write_text(json.dumps(params))
    return time.perf_counter() - t0


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
        fast_s = budget.run_seconds(
            {"train": fast_ft, "forward": fast_inf, "tta": fast_tta},
            r["n_train"],
            r["n_val"],
            r["n_test"],
            r["epochs_finetune"],
            ema=False,
        )
        course_s = (
            r["epochs_frozen"] * (r["n_train"] / c_frozen_step + r["n_val"] / c_inf)
            + r["epochs_finetune"] * (r["n_train"] / c_ft + r["n_val"] / c_inf)
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
        ]
    al = res.get("allocator")
    if al:
        lines += [
            "",
            f"7. The allocator (Lite0, {al['img_size']} px, fresh processes, best of rounds): "
            f"features of {al['n_feature_images']} images, a fine-tuning epoch of "
            f"{al['n_train_images']}",
            f"   {'':42}{'wall s':>8}{'user s':>8}{'sys s':>8}{'minor faults':>14}",
        ]
        for mode, label in (("default", "glibc's default"), ("keep", "mallopt (keep_freed)"),
                            ("env", "GLIBC_TUNABLES (run.py)")):  # fmt: skip
            for part in ("features", "finetune_epoch"):
                v = al[mode][part]
                lines.append(
                    f"   {label + ', ' + part.replace('_', ' '):42}{fmt(v['wall']):>8}"
                    f"{fmt(v['user']):>8}{fmt(v['sys']):>8}{v['minor_faults']:>14,}"
                )
        lines.append("   speed-up over the default: " + ", ".join(
            f"{k} {fmt(v, 2)}x" for k, v in al["speedup"].items()))  # fmt: skip
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
# 7. The allocator: glibc's default against keeping freed memory (config.keep_freed_memory)
# =============================================================================================
def allocator_probe(mode: str, img_size: int, n_features: int, n_train: int, seed: int) -> int:
    """Run inside a subprocess: feature extraction, then a fine-tuning epoch, each with its wall,
    user and system seconds and minor page faults: glibc's default, ``keep`` (mallopt in this
    process) or ``env`` (``GLIBC_TUNABLES`` set before the process started, as run.py does)."""
    note = config.keep_freed_memory() if mode == "keep" else f"allocator: {mode}"
    torch.manual_seed(seed)
    model, _ = models.build_model("efficientnet_lite0", pretrained=False)
    model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed)
    feats_x = torch.randn(64, 3, img_size, img_size, generator=gen)
    train_x = torch.randn(32, 3, img_size, img_size, generator=gen)
    train_y = (torch.rand(32, config.NUM_CLASSES, generator=gen) < 0.04).float()
    criterion = nn.BCEWithLogitsLoss()
    groups = models.param_groups(model, 1e-4, 0.1)
    optimizer = training.make_optimizer(groups, torch.device("cpu"), 1e-4)
    model.train()
    h.train_loop([(train_x, train_y)], model, criterion, optimizer, "cpu")  # warm-up: not timed

    def timed(fn):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "wall": time.perf_counter() - t0,
            "user": r1.ru_utime - r0.ru_utime,
            "sys": r1.ru_stime - r0.ru_stime,
            "minor_faults": r1.ru_minflt - r0.ru_minflt,
        }

    def extract():
        with torch.inference_mode():
            for _ in range(max(1, n_features // 64)):
                model.backbone.eval()(feats_x)

    def epoch():
        batches = [(train_x, train_y)] * max(1, n_train // 32)
        h.train_loop(batches, model, criterion, optimizer, "cpu")

    print(json.dumps({"mode": mode, "note": note, "features": timed(extract),
                      "finetune_epoch": timed(epoch)}))  # fmt: skip
    return 0


def bench_allocator(args) -> dict:
    """Each mode in fresh processes (the setting acts on a whole process), in alternation."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    n_features, n_train = (64, 32) if args.quick else (640, 320)
    import run  # the setting run.py starts itself with

    runs = {"default": [], "keep": [], "env": []}
    tunable = run.kernel_environment()["GLIBC_TUNABLES"]
    for _ in range(max(1, args.rounds - 1)):
        for mode in runs:
            cmd = [sys.executable, str(ROOT / "benchmark.py"), "--allocator-probe", mode,
                   "--img-size", str(args.img_size), "--seed", str(args.seed),
                   "--probe-sizes", f"{n_features},{n_train}"]  # fmt: skip
            mode_env = {**env, "GLIBC_TUNABLES": tunable} if mode == "env" else env
            out = subprocess.run(cmd, env=mode_env, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    res = {"n_feature_images": n_features, "n_train_images": n_train, "img_size": args.img_size}
    for mode, rounds in runs.items():
        res[mode] = {part: min((r[part] for r in rounds), key=lambda x: x["wall"])
                     for part in ("features", "finetune_epoch")}  # fmt: skip
        res[mode]["note"] = rounds[0]["note"]
    wall = lambda mode, part: res[mode][part]["wall"]  # noqa: E731
    parts = ("features", "finetune_epoch")
    res["speedup"] = {f"{mode} {part}": ratio(wall("default", part), wall(mode, part))
                      for mode in ("keep", "env") for part in parts}  # fmt: skip
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
}
DEFAULTS = {
    "epochs": 20,
    "course_epochs": 0,
    "frozen_img_size": 128,
    "batch_size": 64,
    "img_size": 224,
    "label_files": 65_000,
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
        "convnext_tiny,efficientnet_v2_s,mobilenet_v3_large,efficientnet_lite0",
    ),
}
SECTIONS = ("frozen", "loader", "finetune", "labels", "allocator")


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
        "(CPU: efficientnet_lite0,mobilenet_v3_large; CUDA: adds convnext_tiny, efficientnet_v2_s)",
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
    p.add_argument("--allocator-probe", choices=("default", "keep", "env"), help=argparse.SUPPRESS)
    p.add_argument("--probe-sizes", default="640,320", help=argparse.SUPPRESS)
    p.add_argument("--keep-freed-memory", default="yes", choices=("yes", "no"),
                   help="keep freed memory for reuse in this process (config.keep_freed_memory; "
                   "'no' to measure without)")  # fmt: skip
    args = p.parse_args(argv)
    if args.labels_worker or args.allocator_probe:
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
    if args.allocator_probe:
        n_features, n_train = (int(v) for v in args.probe_sizes.split(","))
        return allocator_probe(args.allocator_probe, args.img_size or 224, n_features, n_train,
                               args.seed)  # fmt: skip
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
