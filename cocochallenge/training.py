"""Training pieces the notebook's epoch loop is built from.

The optimiser for the device, the learning-rate schedule, the weights' moving average,
predictions with flip TTA, and the frozen phase's cached features (the backbone's output
computed once instead of every epoch). The loop itself, and the course's ``train_loop`` and
``validation_loop`` it calls, are in the notebook and in ``helpers.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    ConcatDataset,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
)

from .config import progress, release_freed_memory
from .files import StaleRunError, differences, load_torch, torch_save_atomic, trained


def autocast(device: torch.device, dtype):
    """Autocast to ``dtype`` on ``device``, a no-op when ``dtype`` is None: one code path."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def make_optimizer(groups, device: torch.device, lr: float):
    """AdamW, fused into one kernel per step on CUDA (fewer launches, same maths)."""
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, **kwargs)


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int = 0):
    """Per-step schedule: linear warm-up, then cosine decay to zero (torch's ``SequentialLR``).

    Warm-up keeps the first updates of a freshly unfrozen backbone small, when the head's
    gradients are still large; the cosine tail is where the best validation epochs come from.
    Each parameter group decays from its own rate (the backbone's stays 10x lower).
    """
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    total_steps = max(1, int(total_steps))
    warmup_steps = min(int(warmup_steps), total_steps - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps)
    if warmup_steps <= 0:
        return cosine
    warm = LinearLR(
        optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1
    )
    return SequentialLR(optimizer, [warm, cosine], milestones=[warmup_steps])


def make_ema(model: nn.Module, steps_per_epoch: int, epochs: float):
    """An exponential moving average of ``model``'s weights (timm's ``ModelEmaV3``), or None.

    The average's span is given in epochs, not as a decay: ``decay = 1 - 1 / (epochs x
    steps_per_epoch)``, so the same setting averages over the same share of training on 600
    photos (a few dozen steps) and on 58,000 (a thousand steps per epoch), where a fixed decay
    such as 0.9998 would average over five epochs on the course data and over nothing but the
    starting weights on a small set. It starts from the model as it is (the frozen phase's
    best head on the ImageNet backbone) and is evaluated beside the raw weights every epoch.
    """
    if epochs <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=1.0 - 1.0 / max(1.0, epochs * steps_per_epoch))


@torch.inference_mode()
def predict(
    model,
    loader,
    device,
    criterion=None,
    tta_flip: bool = False,
    amp_dtype=None,
    show_progress: bool = True,
    desc: str = "predict",
    stacked: bool | None = None,
) -> dict:
    """Probabilities for a whole loader, with horizontal-flip TTA.

    Returns ``probs`` (no TTA), ``probs_tta`` (mean of image and mirror, when ``tta_flip``),
    ``targets`` or ``stems`` (whatever the dataset's second item is) and the mean ``loss``
    on the un-flipped logits when a criterion is given. With ``stacked`` (the default on
    CUDA) the image and its mirror go through the network as one batch (one launch per layer
    instead of two); on a CPU two calls on the smaller batches measured 16-25% faster.
    """
    model.eval()
    stacked = (device.type == "cuda") if stacked is None else stacked
    probs, probs_tta, second = [], [], []
    loss_sum, seen = 0.0, 0
    for x, extra in progress(loader, show_progress, desc=desc, leave=False):
        n = len(x)
        x = x.to(device, non_blocking=True)
        both = tta_flip and stacked
        if both:
            x = torch.cat([x, x.flip(-1)])
        with autocast(device, amp_dtype):
            logits = model(x).float()
            if tta_flip and not both:
                logits = torch.cat([logits, model(x.flip(-1)).float()])
        p = torch.sigmoid(logits)
        probs.append(p[:n].cpu())
        if tta_flip:
            probs_tta.append(((p[:n] + p[n:]) / 2).cpu())
        if criterion is not None and torch.is_tensor(extra):
            loss_sum += float(criterion(logits[:n], extra.to(device).float())) * n
        second.append(extra)
        seen += n
    out = {"probs": torch.cat(probs).numpy()}
    if tta_flip:
        out["probs_tta"] = torch.cat(probs_tta).numpy()
    if second and torch.is_tensor(second[0]):
        out["targets"] = torch.cat(second).numpy().astype(np.uint8)
    else:
        out["stems"] = [s for batch in second for s in batch]
    if criterion is not None:
        out["loss"] = loss_sum / max(seen, 1)
    return out


# ---- Frozen phase from cached features ------------------------------------------------------
@torch.inference_mode()
def extract_features(
    backbone: nn.Module,
    loader,
    device,
    amp_dtype=None,
    show_progress: bool = True,
    desc: str = "features",
) -> torch.Tensor:
    """Pooled backbone features of every image, once, as a float16 CPU tensor.

    While the backbone is frozen and its inputs are not augmented, its output is the same
    every epoch: the course loop recomputes the whole network each time, this computes it
    once and lets the head train for as many epochs as wanted on ``N x dim`` numbers.
    """
    rows = len(loader.dataset) if hasattr(loader, "dataset") else None
    if rows is None:  # batches without a dataset (a list): gathered, then joined
        return torch.cat(list(_feature_batches(backbone, loader, device, amp_dtype,
                                               show_progress, desc)))  # fmt: skip
    return _features_into(backbone, loader, device, [rows], amp_dtype, show_progress, desc)[0]


def _feature_batches(backbone, loader, device, amp_dtype, show_progress, desc):
    """The float16 CPU features of each batch of ``loader``, in order."""
    backbone.eval()
    if getattr(loader, "num_workers", 0) > 0:
        release_freed_memory()  # before the workers fork: see there
    for x, _ in progress(loader, show_progress, desc=desc, leave=False):
        with autocast(device, amp_dtype):
            yield backbone(x.to(device, non_blocking=True)).float().half().cpu()


def _features_into(backbone, loader, device, sizes, amp_dtype, show_progress, desc) -> list:
    """The features of ``loader``'s rows written into one tensor per part of ``sizes`` rows,
    each made at the first batch: no second copy of the whole set. For 58,500 + 6,500 x 1,280
    features (160 MB) the peak RSS rose 183 MB, against 401 MB with batches gathered, joined,
    then split into parts."""
    parts, part, row = [], 0, 0
    for f in _feature_batches(backbone, loader, device, amp_dtype, show_progress, desc):
        if not parts:
            parts = [torch.empty((n, *f.shape[1:]), dtype=f.dtype) for n in sizes]
        while len(f):
            while part < len(sizes) and row == sizes[part]:  # this part is full: the next
                part, row = part + 1, 0
            if part == len(sizes):
                raise ValueError(f"the loader gave more rows than its {sum(sizes)} images")
            take = min(len(f), sizes[part] - row)
            parts[part][row : row + take] = f[:take]
            f, row = f[take:], row + take
    while part < len(sizes) and row == sizes[part]:
        part, row = part + 1, 0
    if not parts or part < len(sizes):
        raise ValueError(f"the loader gave fewer rows than its {sum(sizes)} images")
    return parts


def cached_features(
    path: Path | str, backbone, loader, device, key: dict | None = None, log=print, **kwargs
) -> torch.Tensor:
    """:func:`extract_features`, saved to ``path`` so a restarted session does not redo it.

    ``key`` records what the features depend on (backbone, input size, padding,
    normalisation, image ids); a saved file with another key, or another number of rows, is
    stale: it is never silently used. Computed again (said in one line) where no trained model
    used it (``path``'s folder, :func:`files.trained`), else it stops the run
    (:class:`~cocochallenge.files.StaleRunError`).
    """
    path = Path(path)
    key = {**(key or {}), "rows": len(loader.dataset)}
    feats = _load_features(path, key, log) if path.exists() else None
    if feats is None:
        feats = extract_features(backbone, loader, device, **kwargs)
        torch_save_atomic({"key": key, "feats": feats}, path)
    return feats


def load_features(path: Path | str, key: dict | None = None) -> torch.Tensor:
    """The features :func:`cached_features` saved at ``path``; a damaged file is named
    (:class:`~cocochallenge.files.CorruptFile`), one saved under another ``key`` is stale
    (:class:`~cocochallenge.files.StaleRunError`)."""
    return _load_features(Path(path), key, log=None)


def _load_features(path: Path, key: dict | None, log=print) -> torch.Tensor | None:
    """The saved features at ``path``. Saved under another ``key``: None where ``log`` is given
    and no trained model used them (a failed try's: computed again, said in one line), else
    :class:`~cocochallenge.files.StaleRunError`."""
    saved = load_torch(path)  # a damaged cache is named, with what to do
    diffs = differences(saved.get("key", {}), key) if key is not None else []
    if not diffs:
        return saved["feats"]
    if log is None or trained(path.parent):
        raise StaleRunError(
            f"{path} was computed for other images or preprocessing than its trained model "
            "uses:\n  " + "\n  ".join(diffs) + f"\nNothing was trained. Move {path.parent} out "
            "of the run folder (that backbone is trained again), or set RUN_DIR to a new folder."
        )
    log(f"{path.name}: computed again ({'; '.join(diffs)}); no model was trained on the old one")
    return None


class _ImagesOf(Dataset):
    """The images of several datasets one after the other, without their second items (labels
    in one part, file stems in another would not batch together)."""

    def __init__(self, datasets):
        self.images = ConcatDataset(datasets)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i][0], 0


def one_pass_loader(loaders: list[DataLoader]) -> DataLoader:
    """One loader over the images of ``loaders``, in their order, with the first one's settings.

    Each loader with workers starts its own processes and fills its own pipeline before its
    first batch. Measured here (EfficientNet-Lite0, 128 px, 2 workers, 2 cores; a straight
    line through 125 and 500 images), a train and a validation loader cost 0.31 s fixed
    against 0.14 s for one loader over both, 3.15 ms per image either way (2.1 s against
    1.2 s before the kept memory was released at each start, :func:`release_freed_memory`).
    """
    for loader in loaders:
        if not isinstance(loader.sampler, SequentialSampler) or loader.drop_last:
            raise ValueError("features need every image in order: a loader without shuffle "
                             "or drop_last")  # fmt: skip
    if len(loaders) == 1:
        return loaders[0]
    first = loaders[0]
    workers = first.num_workers
    more = dict(prefetch_factor=first.prefetch_factor, persistent_workers=False) if workers else {}
    return DataLoader(
        _ImagesOf([loader.dataset for loader in loaders]),
        batch_size=first.batch_size,
        num_workers=workers,
        pin_memory=first.pin_memory,
        worker_init_fn=first.worker_init_fn,
        multiprocessing_context=first.multiprocessing_context,
        **more,
    )


def extract_feature_parts(backbone: nn.Module, loaders: dict, device, **kwargs) -> dict:
    """:func:`extract_features` of several parts (``{name: loader}``) in one pass over all their
    images (:func:`one_pass_loader`): one start of the loader's workers, not one per part."""
    names = list(loaders)
    sizes = [len(loaders[n].dataset) for n in names]
    options = dict(amp_dtype=None, show_progress=True, desc="features") | kwargs
    joint = one_pass_loader(list(loaders.values()))
    # each part its own tensor, filled as the batches come (a view of one tensor would save
    # the whole pass's storage in each part's file)
    return dict(zip(names, _features_into(backbone, joint, device, sizes, **options)))


def cached_feature_parts(
    paths: dict, backbone, loaders: dict, device, key: dict | None = None, log=print, **kwargs
) -> dict:
    """:func:`cached_features` of several parts (``{part: path}``, ``{part: loader}``), the parts
    not saved yet computed in one pass (:func:`extract_feature_parts`).

    Each part keeps its own file, saved atomically, and its own key, ``key`` with ``"part"``
    and ``"rows"`` added: the files and keys :func:`cached_features` writes with ``key={**key,
    "part": part}``, so each checks and reuses the other's. A saved part with another key is
    computed again, or stops the run before anything is computed, as there.
    """
    keys = {part: {**(key or {}), "part": part, "rows": len(loaders[part].dataset)}
            for part in paths}  # fmt: skip
    out = {}
    for part, p in paths.items():
        feats = _load_features(Path(p), keys[part], log) if Path(p).exists() else None
        if feats is not None:
            out[part] = feats
    todo = {part: loaders[part] for part in paths if part not in out}
    if todo:
        for part, feats in extract_feature_parts(backbone, todo, device, **kwargs).items():
            torch_save_atomic({"key": keys[part], "feats": feats}, paths[part])
            out[part] = feats
    return {part: out[part] for part in paths}


class CachedFeatures(Dataset):
    """Cached features and their targets, served a whole batch per index list.

    With a ``BatchSampler`` as sampler a loader asks for one batch at a time, so a 58,000-row
    epoch is a few hundred tensor slices instead of 58,000 ``__getitem__`` calls. The float16
    cache is cast to float32 per batch, for the head's float32 weights.
    """

    def __init__(self, feats: torch.Tensor, targets):
        self.feats = feats
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
        if len(self.feats) != len(self.targets):
            raise ValueError(f"{len(self.feats)} feature rows for {len(self.targets)} targets")

    def __len__(self):
        return len(self.feats)

    def __getitem__(self, idx):
        return self.feats[idx].float(), self.targets[idx]


def feature_loader(feats: torch.Tensor, targets, batch_size: int, shuffle: bool) -> DataLoader:
    """A loader of cached features for the course's ``train_loop``/``validation_loop``.

    Shuffling draws from torch's global generator, which the epoch loop reseeds from
    ``(seed, epoch)``: a resumed run replays the same batch order.
    """
    ds = CachedFeatures(feats, targets)
    sampler = RandomSampler(ds) if shuffle else SequentialSampler(ds)
    return DataLoader(
        ds, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None
    )


def log_scalars(
    writer, phase: str, step: int, train: dict, val: dict, ema: dict | None = None
) -> None:
    """Plain per-phase TensorBoard tags (``frozen/train_loss``, ``finetune/val_mAP`` ...).

    The course's ``update_graphs`` draws train against validation in one chart per metric,
    which TensorBoard lists as one sub-run per line; these tags list as one run per backbone.
    ``ema`` (the moving average's validation) adds ``<phase>/ema_*`` tags.
    """
    for prefix, d in (("train", train), ("val", val), ("ema", ema or {})):
        for k in ("loss", "f1", "precision", "recall", "mAP"):
            if isinstance(d.get(k), (int, float)):
                name = "course_f1" if k == "f1" else k
                writer.add_scalar(f"{phase}/{prefix}_{name}", d[k], step)
