"""Run-folder files: atomic writes, and the check that what is on disk matches the settings.

A crash or a kill never leaves a half-written artifact that a later run reads, and an
artifact made with other settings is reported, never silently reused.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


@contextlib.contextmanager
def atomic_path(path: Path | str):
    """Yield a temporary path beside ``path``; rename it over ``path`` only when the block ends.

    ``os.replace`` is atomic on one filesystem, so readers see the old file or the new one,
    never a truncated mix. On an error the temporary file is removed and the old file kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a normal write gives the umask's
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_json(obj, path: Path | str, indent: int | None = 1) -> Path:
    """Write JSON atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, default=_json_default))
    return Path(path)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_json(path: Path | str):
    return json.loads(Path(path).read_text())


def torch_save_atomic(obj, path: Path | str) -> Path:
    """``torch.save`` through a temporary file, so a killed run never leaves a torn checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_npz(path: Path | str, **arrays) -> Path:
    """Compressed ``.npz`` written atomically (validation scores for the analysis notebook)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return Path(path)


class StaleRunError(RuntimeError):
    """The run folder holds results made with other settings or other data; nothing was trained."""


def differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every setting that differs (JSON round trip: lists, floats)."""
    import json

    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    return [
        f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def stale_message(what: str, diffs: list[str], run_dir: Path, switch: str) -> str:
    return (
        f"{what} in {run_dir} was made with other settings or data:\n  "
        + "\n  ".join(diffs)
        + f"\nNothing was trained. Either set RUN_DIR to a new folder (this one stays as it is), "
        f"or set {switch} in the parameters cell to train it again here (its old files "
        f"are moved to {run_dir / 'replaced'}/, not deleted)."
    )


def shown_path(path: Path | str) -> str:
    """A path as a notebook should print it: relative to the working folder when inside it.

    Absolute paths of the machine a notebook ran on say nothing to its reader (and leak the
    author's home folder into a handed-in notebook).
    """
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
