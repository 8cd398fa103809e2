"""Data: the challenge layout, labels read once, the start-up scan of every file.

Everything here fails early with a message that names the file and says what to do: a run
that dies hours in, or trains on a silently half-read folder, costs a team far more.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .config import CLASSES, COURSE_DATA_ROOT, NUM_CLASSES
from .demo import make_demo_data
from .files import SaysWhatToDo

if TYPE_CHECKING:
    import pandas as pd

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
    "Each file directly in its folder, images named .jpg (lower case).\n"
    f"On the course JupyterHub the data usually lives in {COURSE_DATA_ROOT}."
)
#: Suffixes of image files: one of them on a file that is not named ``.jpg`` is a misnamed
#: image, which the course's datasets (they list ``*.jpg``) would silently leave out.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif",
                  ".tiff"}  # fmt: skip


class DataError(SaysWhatToDo, ValueError):
    """Bad input data: the message names the file (and line) and says what to do."""


def data_paths(root: Path | str) -> dict:
    """The three challenge folders under ``root``."""
    root = Path(root)
    return {k: root / v for k, v in LAYOUT.items()}


def check_data_root(root: Path | str, need_test: bool = True) -> dict:
    """Fail before any training when the data folder is not in the challenge layout.

    Each folder must hold its files directly, named as the course's datasets read them: a
    folder unzipped one level too deep, or images named ``.jpeg``/``.JPG``/``.png``, would
    otherwise read as "0 test images" and fail only after training.
    """
    if not str(root).strip():
        raise DataError(
            f'DATA_ROOT is empty: set it to the unzipped ms-coco folder, or to "{DEMO}" for '
            f"generated demo data.\n{LAYOUT_HELP}"
        )
    root = Path(root).expanduser()
    if root.is_file():
        unzip = f" (unzip it first: unzip {root} -d <folder>)" if root.suffix == ".zip" else ""
        raise DataError(f"data root {root} is a file, not a folder{unzip}.\n{LAYOUT_HELP}")
    if not root.is_dir():
        raise DataError(
            f"data root {root} does not exist.\n{LAYOUT_HELP}\nWithout the course "
            f'data, DATA_ROOT = "{DEMO}" runs on generated demo data.'
        )
    paths = data_paths(root)
    for key, path in paths.items():
        if key == "test_images" and not need_test:
            continue
        if not path.is_dir():
            deeper = [p.parents[len(LAYOUT[key].parts) - 1] for p in root.glob(f"*/{LAYOUT[key]}")]
            hint = f"\nIt is one folder deeper: set DATA_ROOT to {min(deeper)}." if deeper else ""
            raise DataError(f"{path} is missing under the data root {root}.{hint}\n{LAYOUT_HELP}")
        _check_folder(path, ".cls" if key == "train_labels" else ".jpg")
    return paths


def _check_folder(path: Path, suffix: str) -> None:
    """Stop unless ``path`` holds its files directly, each image named ``.jpg``."""
    with os.scandir(path) as it:
        names = [e.name for e in it if not e.name.startswith(".")]
    if suffix == ".jpg":
        other = sorted(n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES
                       and not n.endswith(".jpg"))  # fmt: skip
        if other:
            raise DataError(
                f"{len(other)} images in {path} are not named <id>.jpg, e.g. {other[:3]}: the "
                "datasets read only .jpg files, so they would be left out. Rename them to "
                "<id>.jpg (same id), or extract the folder again from the course's zip file."
            )
    if any(n.endswith(suffix) for n in names):
        return
    for name in sorted(names):
        inner = path / name
        if inner.is_dir() and any(n.endswith(suffix) for n in os.listdir(inner)):
            raise DataError(
                f"{path} holds no {suffix} files, but {inner} does: the files are one folder "
                f"too deep. Move them up (mv {inner}/* {path}/), or unzip the course's zip file "
                f"again so that they sit directly in {path.name}.\n{LAYOUT_HELP}"
            )
    what = "is empty" if not names else f"holds no {suffix} files (only {sorted(names)[:3]})"
    raise DataError(f"{path} {what}.\n{LAYOUT_HELP}")


#: The value of ``DATA_ROOT`` that asks for generated demo data.
DEMO = "demo"


def resolve_data_root(
    root: str | Path,
    demo_dir: Path | str = "data/demo/ms-coco",
    n_train: int = 1000,
    n_test: int = 200,
    seed: int = 0,
) -> tuple[Path, bool]:
    """Return ``(data root, is_demo)``: the folder named, or demo data when ``root`` is "demo".

    Only what was asked for is used: a folder that is not there is an error that says what to
    do, never replaced by another (the course's, or demo data). Demo data is generated once
    into ``demo_dir`` and reused.
    """
    if str(root) == DEMO:
        try:
            make_demo_data(
                demo_dir, n_train=n_train, n_test=n_test, seed=seed, progress=False, replace=False
            )
        except ValueError as err:
            raise DataError(str(err)) from None
        return Path(demo_dir), True
    check_data_root(root)
    return Path(root).expanduser(), False


def parse_label_text(text: str, source: str, notes: list | None = None) -> list[int]:
    """Class indices of one ``.cls`` file: sorted, unique, each checked.

    Lines are split and read as ``helpers.COCOTrainImageDataset`` reads them (a text file's
    line endings, ``int`` of each line), so that what passes here also trains. Blank lines,
    spaces around an index, Windows line endings and a repeated index are accepted (hand-edited
    files have them; a repeat is noted in ``notes`` and counted once); anything else that is not
    an integer in 0..79 raises a :class:`DataError` that names the file and the line, because a
    wrong label silently corrupts training and the metric.
    """
    out = set()
    for lineno, line in enumerate(io.StringIO(text, newline=None), 1):  # as open() splits
        line = line.strip()
        if not line:
            continue
        try:
            value = int(line)
        except ValueError:
            raise DataError(
                f"{source}, line {lineno}: {line!r} is not a class index "
                f"(one integer 0..{NUM_CLASSES - 1} per line expected)"
            ) from None
        if not 0 <= value < NUM_CLASSES:
            raise DataError(
                f"{source}, line {lineno}: class index {value} is outside 0..{NUM_CLASSES - 1}"
            )
        if value in out and notes is not None:
            notes.append((source, f"line {lineno}: class {value} repeated (counted once)"))
        out.add(value)
    return sorted(out)


def read_label_matrix(
    label_dir: Path | str, names: list[str], notes: list | None = None
) -> np.ndarray:
    """Parse every ``.cls`` file once into an ``(N, 80)`` uint8 multi-hot matrix, checked.

    65,000 small files take a couple of seconds to read once; the split, the class statistics
    and the analysis reuse this matrix. A bad line stops the run here, naming the file.
    """
    label_dir = Path(label_dir)
    Y = np.zeros((len(names), NUM_CLASSES), dtype=np.uint8)
    for i, name in enumerate(names):
        path = label_dir / name
        try:  # utf-8-sig, as helpers.COCOTrainImageDataset opens it: a byte-order mark is skipped
            with open(path, encoding="utf-8-sig") as fh:
                text = fh.read()
        except UnicodeDecodeError:
            raise DataError(
                f"{path}: not a text file (one class index per line expected)"
            ) from None
        # an empty file is legal: COCO has photos with none of the 80 objects in them
        Y[i, parse_label_text(text, str(path), notes)] = 1
    return Y


def list_files(folder: Path | str, suffix: str) -> list[str]:
    """Sorted names in ``folder`` ending with ``suffix`` (``os.scandir``: fast on 65k files)."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.name.endswith(suffix) and not e.name.startswith("."))


def load_rgb(path: Path | str) -> Image.Image:
    """Open an image as RGB; grayscale, CMYK and palette images are converted, not rejected.

    A 16-bit grayscale image is scaled to 8 bits, as ``helpers._rgb`` does for the datasets
    (PIL's own conversion clips it at 255: almost white).

    An unreadable file raises a :class:`DataError` that names it (the start-up scan,
    :func:`scan_data`, normally finds such files before any training starts).
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I"):  # 16-bit grayscale: I;16 (I in older Pillow)
                return img.convert("I").point(lambda v: v / 256, "L").convert("RGB")
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"{path}: cannot be read as an image ({err}); re-extract it from the course's zip "
            "file (the start-up scan, scan.scan_data, finds such files before training)"
        ) from None


def stems(dataset) -> list[str]:
    """The image ids of a course dataset, in its order (file names without extension)."""
    names = dataset.img_labels if hasattr(dataset, "img_labels") else dataset.img_list
    return [Path(n).stem for n in names]


#: Share of empty label files above which the labels look wrong rather than merely sparse:
#: about 1% of COCO photos show none of the 80 classes.
MAX_EMPTY_LABELS = 0.05


def labels_of(
    dataset, notes: list | None = None, max_empty: float = MAX_EMPTY_LABELS
) -> np.ndarray:
    """The ``(N, 80)`` label matrix of a :class:`helpers.COCOTrainImageDataset`, read once.

    Every line is checked (a bad one stops the run, naming the file and the line). An empty
    file is legal, a photo with none of the classes, and counted in ``notes``; a set with no
    positive label at all, or with more than ``max_empty`` of its files empty (and more than
    5), stops the run:
    training on it would only learn that nothing is ever there.
    """
    Y = read_label_matrix(dataset.annotations_dir, dataset.img_labels, notes)
    empty = [n for n, row in zip(dataset.img_labels, Y) if not row.any()]
    where = Path(dataset.annotations_dir)
    if len(Y) and not Y.any():
        raise DataError(f"all {len(Y)} label files in {where} are empty: nothing to learn. "
                        "Re-extract labels/train from the course's zip file.")  # fmt: skip
    if len(empty) > max(5, max_empty * len(Y)):
        raise DataError(
            f"{len(empty)} of {len(Y)} label files in {where} are empty (more than "
            f"{max_empty:.0%}), e.g. {empty[:3]}: the labels look damaged. Re-extract "
            "labels/train from the course's zip file."
        )
    if empty and notes is not None:
        notes.append((where, f"{len(empty)} label files are empty (photos with none of the "
                             f"classes), e.g. {empty[:3]}: used as such"))  # fmt: skip
    return Y


def drop_images(dataset, skip) -> None:
    """Leave images out of a course training dataset (unreadable ones :func:`scan_data` found)."""
    skip = set(skip)
    dataset.img_labels = [n for n in dataset.img_labels if Path(n).stem not in skip]


class LabelledSubset(Dataset):
    """Part of a course training dataset, with a transform of its own.

    The classic bug is ``random_split`` followed by ``subset.dataset.transform = ...``: both
    sides share one dataset object, so the validation images end up augmented (or the training
    images not). Here the course dataset has no transform (its items are PIL images) and each
    view applies its own.
    """

    def __init__(self, base, indices, transform):
        if base.transform is not None:
            raise ValueError("build the course dataset without a transform: each view has its own")
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        names = stems(base)  # once: once per index, it was 65,000 passes over 65,000 ids
        self.stems = [names[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, target = self.base[int(self.indices[i])]
        return (self.transform(image) if self.transform else image), target


def class_statistics(Y: np.ndarray) -> pd.DataFrame:
    """Images per class and prevalence, sorted as the class index (a table for the notebook)."""
    import pandas as pd

    counts = Y.sum(axis=0).astype(int)
    return pd.DataFrame({"class": CLASSES, "images": counts, "prevalence": counts / max(len(Y), 1)})


def with_transform(dataset, transform):
    """A shallow copy of a dataset with another transform (the original is left untouched)."""
    out = type(dataset).__new__(type(dataset))
    out.__dict__.update(dataset.__dict__)
    out.transform = transform
    return out


def inventory(train_set, labels: np.ndarray) -> dict:
    """``{image id: "file size:classes"}`` of the labelled set: what a trained model depends on.

    File sizes stand for the image content (a re-encoded or replaced JPEG changes size) at the
    cost of one ``stat`` per file, where hashing 65,000 images would take minutes. Stored with
    the split, it names the files added, removed or changed when the data changes.
    """
    folder = Path(train_set.img_dir)
    return {s: f"{os.stat(folder / f'{s}.jpg').st_size}:{','.join(map(str, np.flatnonzero(y)))}"
            for s, y in zip(stems(train_set), labels)}  # fmt: skip


def digest(inventory: dict) -> str:
    """A short digest of an inventory (or of any ``{name: value}`` of strings)."""
    import hashlib

    text = "".join(f"{k}={v};" for k, v in sorted(inventory.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_digest(test_set) -> str:
    """The digest of the test images (ids and sizes): only the test predictions depend on it."""
    folder = Path(test_set.img_dir)
    return digest({n: str(os.stat(folder / n).st_size) for n in test_set.img_list})
