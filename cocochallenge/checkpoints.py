"""Checkpoints of one training phase: the last epoch (to resume) and the best one (to keep).

A JupyterHub session is culled when idle and a kernel can die mid-run: after every epoch the
whole state (model or head, optimiser, scheduler, history, random generators) is written
atomically, so running the notebook again continues after the last complete epoch with the
same batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch

from .config import seed_everything
from .files import load_torch, torch_save_atomic


def seed_epoch(seed: int, epoch: int) -> None:
    """Reseed every generator from ``(seed, epoch)``: batch order, augmentation, dropout."""
    seed_everything(seed * 1009 + epoch)


def _rng_state() -> dict:
    """Every generator's state as tensors, numbers and lists: what a checkpoint may hold."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PhaseCheckpoint:
    """``<folder>/<phase>_last.pt`` and ``<phase>_best.pt`` for the objects in ``state``.

    ``state`` maps names to objects with ``state_dict``/``load_state_dict`` (the model or the
    head under ``"model"``, the optimiser, the scheduler, a grad scaler or None).
    :meth:`resume` returns the epoch to start from; :meth:`save` records one finished epoch
    and says whether it is the best so far (higher ``score`` is better).
    """

    def __init__(self, folder: Path | str, phase: str, state: dict):
        self.folder, self.phase, self.state = Path(folder), phase, state
        self.last_path = self.folder / f"{phase}_last.pt"
        self.best_path = self.folder / f"{phase}_best.pt"
        self.history: list[dict] = []
        self.best = -math.inf
        self.best_epoch = 0

    def resume(self, log=print) -> int:
        """Load the last complete epoch if there is one; return the epoch to start from."""
        if not self.last_path.exists():
            return 0
        ckpt = load_torch(self.last_path)
        for name, obj in self.state.items():
            if obj is not None and ckpt["state"].get(name) is not None:
                obj.load_state_dict(ckpt["state"][name])
        self.history, self.best = ckpt["history"], ckpt["best"]
        self.best_epoch = ckpt.get("best_epoch", 0)
        _set_rng_state(ckpt["rng"])
        start = ckpt["epoch"] + 1
        log(f"[{self.phase}] resuming after epoch {start} from {self.last_path.name}")
        return start

    def save(self, epoch: int, row: dict, score: float, best_module: torch.nn.Module | None = None,
             val_probs=None) -> bool:  # fmt: skip
        """Record a finished epoch (0-based): best model if improved, then the full state.

        ``best_module`` is what the best checkpoint keeps when it is not ``state['model']``
        itself: the moving average of its weights, when that scored higher this epoch.
        ``val_probs``, the validation probabilities of what it keeps, goes with it: the
        analysis compares the phases on them (:func:`best_val_probs`).
        """
        self.history.append(row)
        improved = score > self.best
        if improved:
            self.best, self.best_epoch = float(score), epoch + 1
            module = best_module if best_module is not None else self.state["model"]
            probs = None if val_probs is None else torch.as_tensor(val_probs)
            best = {"model": module.state_dict(), "epoch": epoch + 1, "score": self.best,
                    "val_probs": probs}  # fmt: skip
            torch_save_atomic(best, self.best_path)
        torch_save_atomic(
            {
                "state": {
                    k: (v.state_dict() if v is not None else None) for k, v in self.state.items()
                },
                "history": self.history,
                "best": self.best,
                "best_epoch": self.best_epoch,
                "epoch": epoch,
                "rng": _rng_state(),
            },
            self.last_path,
        )
        return improved

    def best_val_probs(self):
        """The validation probabilities of the best epoch, or None (not saved, or no epoch)."""
        if not self.best_path.exists():
            return None
        probs = load_torch(self.best_path).get("val_probs")
        return None if probs is None else probs.numpy()

    def load_best(self, module: torch.nn.Module) -> None:
        """Put the best epoch's weights into ``module`` (the one ``state['model']`` was)."""
        if self.best_path.exists():
            module.load_state_dict(load_torch(self.best_path)["model"])


def epoch_row(
    phase: str,
    epoch: int,
    offset: int,
    seconds: float,
    train: dict,
    val: dict,
    ema: dict | None = None,
) -> dict:
    """One history row: phase, epochs, time, then ``train_*``, ``val_*`` and ``ema_*`` scalars.

    ``ema`` holds the validation of the weights' moving average, when there is one.
    """
    scalars = lambda d: {k: float(v) if isinstance(v, float) else v  # noqa: E731 (NumPy's too)
                         for k, v in (d or {}).items() if isinstance(v, (int, float))}  # fmt: skip
    return {
        "phase": phase,
        "epoch": epoch + 1,
        "global_epoch": offset + epoch + 1,
        "seconds": seconds,
        **{f"train_{k}": v for k, v in scalars(train).items()},
        **{f"val_{k}": v for k, v in scalars(val).items()},
        **{f"ema_{k}": v for k, v in scalars(ema).items()},
    }


def epoch_line(row: dict, epochs: int, improved: bool) -> str:
    """The printed summary of an epoch, short enough not to wrap in JupyterLab (< 100 chars):
    loss and mAP on the training images (without augmentation), then on validation."""
    ema = f" EMA {row['ema_mAP']:.3f}" if "ema_mAP" in row else ""
    fit = f"{row['train_mAP']:.3f} / " if "train_mAP" in row else ""
    return (
        f"{row['phase']:>8} {row['epoch']:>2}/{epochs}  loss {row['train_loss']:.4f} / "
        f"{row['val_loss']:.4f}  mAP {fit}{row['val_mAP']:.3f}{ema}  F1@0.5 {row['val_f1']:.3f}"
        f" {row['seconds']:5.1f}s{' *best' if improved else ''}"
    )
