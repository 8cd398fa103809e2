"""Training pieces the notebook's epoch loop is built from.

Mixed precision and the optimiser for the device, the learning-rate schedule, the device-side
counts that spare a ``.item()`` per batch, predictions with flip TTA, and the frozen phase's
cached features (the backbone's output computed once instead of every epoch). The loop itself,
and the course's ``train_loop``/``validation_loop`` it calls, are in the notebook and in
``helpers.py``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .config import progress
from .files import StaleRunError, differences, torch_save_atomic
from .metrics import course_scores


def amp_settings(device: torch.device, enabled: bool = True, cpu: bool = False):
    """``(autocast dtype or None, GradScaler or None)`` for the device.

    bfloat16 on GPUs that support it (no loss scaling needed), float16 with a GradScaler on
    older GPUs. On a CPU full precision, unless ``cpu=True`` asks for bfloat16 autocast: it
    is slower than float32 for these convolutions on most laptops, but it runs the GPU's
    mixed-precision code path where a test can check it.
    """
    if not enabled:
        return None, None
    if device.type == "cpu":
        return (torch.bfloat16, None) if cpu else (None, None)
    if device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def autocast(device: torch.device, dtype):
    """An autocast context, or a no-op when ``dtype`` is None: one code path for CPU and GPU."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


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
    warm = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1)
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


class EpochCounts:
    """Loss and course-metric counts of the training predictions, summed on the device.

    Reading them once at the end of the epoch, instead of a ``.item()`` per batch, keeps the
    GPU from waiting for the CPU at every step.
    """

    def __init__(self, num_classes: int, device):
        self.loss = torch.zeros((), device=device)
        self.tp = torch.zeros(num_classes, device=device)
        self.fp = torch.zeros_like(self.tp)
        self.pos = torch.zeros_like(self.tp)
        self.seen = 0

    @torch.no_grad()
    def add(self, logits, y, loss) -> None:
        pred = (logits.detach() > 0).float()          # sigmoid(logit) > 0.5
        self.loss += loss.detach().float() * len(y)
        self.tp += (pred * y).sum(0)
        self.fp += (pred * (1 - y)).sum(0)
        self.pos += y.sum(0)
        self.seen += len(y)

    def result(self) -> dict:
        s = course_scores(self.tp.cpu().numpy(), self.fp.cpu().numpy(), self.pos.cpu().numpy())
        return {"loss": float(self.loss) / max(self.seen, 1), "accuracy": s["accuracy"], "f1": s["f1"],
                "precision": s["precision"], "recall": s["recall"]}


def optimizer_step(loss, optimizer, scheduler=None, scaler=None) -> None:
    """One optimisation step: backward (scaled for float16), update, then the per-step LR."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    if scheduler is not None:
        scheduler.step()


def to_device(x: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    """Move a batch (asynchronously from pinned memory) and lay 4-D images out channels-last."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.inference_mode()
def predict(model, loader, device, criterion=None, tta_flip: bool = False, amp_dtype=None,
            channels_last: bool = False, show_progress: bool = True, desc: str = "predict",
            stacked: bool | None = None) -> dict:
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
        x = to_device(x, device, channels_last)
        with autocast(device, amp_dtype):
            logits = model(x).float()
            if tta_flip and not both:
                logits = torch.cat([logits, model(to_device(x.flip(-1), device, channels_last)).float()])
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
def extract_features(backbone: nn.Module, loader, device, amp_dtype=None, channels_last=False,
                     show_progress: bool = True, desc: str = "features") -> torch.Tensor:
    """Pooled backbone features of every image, once, as a float16 CPU tensor.

    While the backbone is frozen and its inputs are not augmented, its output is the same
    every epoch: the course loop recomputes the whole network each time, this computes it
    once and lets the head train for as many epochs as wanted on ``N x dim`` numbers.
    """
    backbone.eval()
    feats = []
    for x, _ in progress(loader, show_progress, desc=desc, leave=False):
        with autocast(device, amp_dtype):
            feats.append(backbone(to_device(x, device, channels_last)).float().half().cpu())
    return torch.cat(feats)


def cached_features(path: Path | str, backbone, loader, device, key: dict | None = None,
                    **kwargs) -> torch.Tensor:
    """:func:`extract_features`, saved to ``path`` so a restarted session does not redo it.

    ``key`` records what the features depend on (backbone, input size, padding,
    normalisation, image ids); a saved file with another key, or another number of rows, is
    stale and stops the run (:class:`~cocochallenge.files.StaleRunError`): it is never
    silently used, and never silently replaced.
    """
    path = Path(path)
    key = {**(key or {}), "rows": len(loader.dataset)}
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        diffs = differences(saved.get("key", {}), key)
        if diffs:
            raise StaleRunError(f"{path} was computed for other images or preprocessing:\n  "
                                + "\n  ".join(diffs) + "\nUse a new RUN_DIR, or RETRAIN this backbone.")
        return saved["feats"]
    feats = extract_features(backbone, loader, device, **kwargs)
    torch_save_atomic({"key": key, "feats": feats}, path)
    return feats


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
    return DataLoader(ds, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)


def log_scalars(writer, phase: str, step: int, train: dict, val: dict, ema: dict | None = None) -> None:
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


# ---- The offline CPU recipe: a logistic-regression head fitted in one go ---------------------
def fit_logistic(feats: torch.Tensor, targets, C: float = 0.1, max_iter: int = 100) -> nn.Linear:
    """L2-regularised logistic regression for the 80 classes on frozen features, as an ``nn.Linear``.

    On a CPU the frozen features of three EfficientNet-Lite backbones are the best use of a
    few minutes, and a convex fit needs no epochs, no learning rate and no early stopping:
    the features are z-scored (training rows' mean and std), the loss is the summed BCE plus
    ``0.5 * |W|^2 / C``, the bias starts at the class log-odds, and L-BFGS minimises it in
    float32. The z-scoring is folded into the returned layer, which then takes raw features
    like any head. Measured on 678 real COCO photos (3 seeds of 5-fold CV): C 0.03-0.3 within
    0.01 course F1 of each other.
    """
    x = feats.float()
    y = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    prior = y.mean(0).clamp(1e-3, 1 - 1e-3)
    w = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    b = torch.log(prior / (1 - prior)).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-5, tolerance_change=1e-7)

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="sum") \
            + 0.5 * (w * w).sum() / C
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    layer = nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():
        layer.weight.copy_((w / std[:, None]).T)
        layer.bias.copy_(b - (mean / std) @ w)
    return layer


def out_of_fold_probs(feats: torch.Tensor, targets, C: float = 0.1, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Probabilities of every training row from a :func:`fit_logistic` that never saw it.

    Thresholds tuned on these out-of-fold scores of the whole training part (instead of the
    10% validation split) hold out what they tune, and leave the validation split to measure
    them. Folds are multi-label stratified, like the split.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
    y = np.asarray(targets)
    out = np.zeros(y.shape, dtype=np.float32)
    kfold = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for tr, te in kfold.split(np.zeros(len(y)), y):
        layer = fit_logistic(feats[tr], y[tr], C)
        with torch.no_grad():
            out[te] = torch.sigmoid(layer(feats[te].float())).numpy()
    return out
