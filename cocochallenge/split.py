"""The train/validation split: multi-label iterative stratification, stored as image ids.

A random split of 65,000 images leaves the rarest classes with 0-3 validation images, which
makes per-class thresholds and the course metric (weights 1/positives) unstable. The split
is stored in the run folder with what it was made from (seed, fraction, data), so that a
changed setting is seen instead of silently overridden.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from .config import CLASSES
from .files import (
    StaleRunError,
    differences,
    hold_run_folder,
    load_json,
    save_json,
    stale_message,
    trained_models,
)


def stratified_split(Y: np.ndarray, val_fraction: float = 0.1, seed: int = 0):
    """Indices ``(train, val)`` with every class's share kept on both sides.

    The iterative stratification of Sechidis et al. (2011), from the ``iterative-stratification``
    package, then a repair pass (ours): every class with at least 2 images gets one on each
    side, moving the image whose move costs the fewest other classes their presence. The
    repair never grows validation beyond 1.5 times the fraction asked for (and 2 images): on
    a tiny set some classes then stay on one side, and a warning names them.
    """
    if not 0 < val_fraction < 1:
        raise ValueError("val_fraction must be in (0, 1)")
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    Y = np.asarray(Y, dtype=bool)
    splitter = MultilabelStratifiedShuffleSplit(
        n_splits=1, test_size=val_fraction, random_state=seed
    )
    tr, va = next(splitter.split(np.zeros(len(Y)), Y.astype(np.uint8)))
    side = np.zeros(len(Y), dtype=np.int8)
    side[va] = 1
    left = repair_split(Y, side, max_val=max(int(1.5 * val_fraction * len(Y)), len(va) + 2))
    if left:
        names = [CLASSES[c] for c in left]
        warnings.warn(f"classes on one side of the split only (the validation split is too "
                      f"small to hold them all): {names}", stacklevel=2)  # fmt: skip
    return np.flatnonzero(side == 0), np.flatnonzero(side == 1)


def repair_split(Y: np.ndarray, side: np.ndarray, max_passes: int = 50,
                 max_val: int | None = None) -> list[int]:  # fmt: skip
    """Move images so that every class with >= 2 images sits on both sides (in place).

    Returns the classes still on one side (empty when the guarantee holds); a pass moves one
    image per missing (class, side), and passes repeat until nothing is missing or nothing
    can move. A move into validation (side 1) is made only while it holds fewer than
    ``max_val`` images.
    """
    Y = np.asarray(Y, dtype=bool)
    counts = Y.sum(0)
    max_val = len(Y) if max_val is None else max_val

    def missing():
        per_side = np.stack([Y[side == 0].sum(0), Y[side == 1].sum(0)])
        return per_side, [(c, s) for c in np.argsort(counts, kind="stable") if counts[c] >= 2
                          for s in (0, 1) if per_side[s, c] == 0]  # fmt: skip

    for _ in range(max_passes):
        per_side, todo = missing()
        moved = False
        for c, s in todo:
            if per_side[s, c] > 0 or (s == 1 and (side == 1).sum() >= max_val):
                continue
            donors = np.flatnonzero((side == 1 - s) & Y[:, c])
            if len(donors) < 2:  # moving the only one would empty the other side
                continue
            # cost: classes whose last image on the donor side would leave with it
            cost = (Y[donors] & (per_side[1 - s] == 1)[None, :]).sum(1)
            d = donors[int(np.argmin(cost))]
            side[d] = s
            per_side[1 - s] -= Y[d]
            per_side[s] += Y[d]
            moved = True
        if not moved:
            break
    return sorted({int(c) for c, _ in missing()[1]})


def split_id(train_stems, val_stems) -> str:
    """A short digest of which images are on which side."""
    h = hashlib.sha256(
        "\n".join(sorted(train_stems)).encode() + b"|" + "\n".join(sorted(val_stems)).encode()
    )
    return h.hexdigest()[:16]


def describe_changes(old: dict, new: dict, show: int = 3) -> str:
    """Which images were added, removed or changed between two inventories, with counts."""
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    parts = [
        f"{len(v)} {what} (e.g. {', '.join(v[:show])})"
        for what, v in (("added", added), ("removed", removed), ("changed", changed))
        if v
    ]
    return "labelled images " + "; ".join(parts) if parts else "no labelled image changed"


def load_or_make_split(stems: list[str], labels: np.ndarray, path: Path | str,
                       val_fraction: float = 0.1, seed: int = 0, inventory: dict | None = None,
                       replace: bool = False, log=print):  # fmt: skip
    """Indices ``(train, val)`` of the images ``stems``, read from ``path``, else made and written.

    Both notebooks and every later run then use the same images for validation. The file
    stores image ids, the seed, the fraction and the labelled set's inventory (file sizes and
    classes, :func:`data.inventory`) with its digest. If any of them differs from the current
    settings, a split that no trained model of the run folder used (a failed try's) is made
    again, with a one-line note. A split that trained models used stops the run
    (:class:`~cocochallenge.files.StaleRunError`), naming the settings, the images that changed
    and the models, unless ``replace`` says to make a new one: those models are then stale too,
    which the per-backbone check finds from the new split's id. The run folder is held from here
    to the end of the cell (:func:`files.hold_run_folder`): the split is a run's first write.
    """
    from .data import digest

    path = Path(path)
    hold_run_folder(path.parent, log)
    inventory = inventory or {}
    want = {"seed": seed, "val_fraction": val_fraction, "data": digest(inventory)}
    if path.exists():
        saved = load_json(path)
        diffs = differences({k: saved.get(k) for k in want}, want)
        if saved.get("data") != want["data"]:
            diffs = [d for d in diffs if not d.startswith("data:")]
            diffs.append(describe_changes(saved.get("inventory", {}), inventory))
        index = {s: i for i, s in enumerate(stems)}
        unknown = [s for s in saved["train"] + saved["val"] if s not in index]
        if not diffs and (unknown or len(saved["train"]) + len(saved["val"]) != len(stems)):
            covered = len(saved["train"]) + len(saved["val"])
            diffs.append(f"images: the split covers {covered} ({len(unknown)} not in the data), "
                         f"the data has {len(stems)}")  # fmt: skip
        if not diffs:
            return (
                np.array([index[s] for s in saved["train"]], dtype=np.int64),
                np.array([index[s] for s in saved["val"]], dtype=np.int64),
            )
        used = trained_models(path.parent)
        if used and not replace:
            what = f"the split (split.json), which {', '.join(used)} trained on,"
            switch = 'OPTIONS = {"retrain": ["all"]}'
            raise StaleRunError(stale_message(what, diffs, path.parent, switch))
        if not used:
            log(f"split.json: made again ({'; '.join(diffs)}); no model was trained on the old one")
    tr, va = stratified_split(labels, val_fraction, seed)
    train, val = [stems[i] for i in tr], [stems[i] for i in va]
    record = {**want, "id": split_id(train, val), "train": train, "val": val,
              "inventory": inventory}  # fmt: skip
    save_json(record, path, indent=None)
    return tr, va
