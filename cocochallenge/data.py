"""Data: the challenge layout, labels read once, the start-up scan of every file.

Everything here fails early with a message that names the file and says what to do: a run
that dies hours in, or trains on a silently half-read folder, costs a team far more.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .config import CLASSES, COURSE_DATA_ROOT, NUM_CLASSES, progress
from .demo import make_demo_data

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
    f"On the course JupyterHub the data usually lives in {COURSE_DATA_ROOT}."
)


class DataError(ValueError):
    """Bad input data: the message names the file (and line) and says what to do."""


def data_paths(root: Path | str) -> dict:
    """The three challenge folders under ``root``."""
    root = Path(root)
    return {k: root / v for k, v in LAYOUT.items()}


def check_data_root(root: Path | str, need_test: bool = True) -> dict:
    """Fail before any training when the data folder is not in the challenge layout."""
    root = Path(root).expanduser()
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
            raise DataError(f"{path} is missing under the data root {root}.\n{LAYOUT_HELP}")
        with os.scandir(path) as it:
            if not any(True for _ in it):
                raise DataError(f"{path} is empty.\n{LAYOUT_HELP}")
    return paths


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
    if not str(root):
        raise DataError(
            "DATA_ROOT is empty: set it to the unzipped ms-coco folder, or to "
            f'"{DEMO}" for generated demo data.'
        )
    check_data_root(root)
    return Path(root).expanduser(), False


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
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8-sig")
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

    An unreadable file raises a :class:`DataError` that names it (the start-up scan,
    :func:`scan_data`, normally finds such files before any training starts).
    """
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(
            f"{path}: cannot be read as an image ({err}); re-extract it from the "
            "course's zip file or delete it (and its .cls label file)"
        ) from None


_IMAGE_MAGIC = {
    b"\x89PNG": "PNG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"RIFF": "WEBP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


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


def scan_data(
    root: Path | str, max_skip_fraction: float = 0.01, show_progress: bool = False
) -> dict:
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
        raise DataError(
            f"{len(bad_names)} test images in {paths['test_images']} are not named "
            f"<12-digit id>.jpg, e.g. {bad_names[:3]}: the leaderboard identifies images "
            "by these ids. Restore the original file names from the course's zip file."
        )
    overlap = sorted(set(test_stems) & (train_imgs | set(label_stems)))
    if overlap:
        raise DataError(
            f"{len(overlap)} test images also appear in the training data, e.g. "
            f"{overlap[:3]}: the folders are mixed up (validation scores would be "
            "meaningless). Re-extract images/test-resized and images/train-resized."
        )
    report, skip = [], set()
    unlabelled = sorted(train_imgs - set(label_stems))
    if unlabelled:
        report.append(
            f"{len(unlabelled)} training images have no label file and are not used, "
            f"e.g. {unlabelled[:3]}"
        )
    missing = [s for s in label_stems if s not in train_imgs]
    for s in missing:
        report.append(
            f"skipped {paths['train_labels'] / (s + '.cls')}: its image {s}.jpg is missing"
        )
    skip.update(missing)
    items = [(s, paths["train_images"] / f"{s}.jpg", True) for s in label_stems if s in train_imgs]
    items += [(s, paths["test_images"] / f"{s}.jpg", False) for s in test_stems]
    test_problems = []
    for stem, path, is_train in progress(items, show_progress, desc="scan images", leave=False):
        problem, note = check_image_file(path)
        if note:
            report.append(f"{path}: {note}")
        if problem and is_train:
            skip.add(stem)
            report.append(f"skipped {path}: {problem}")
        elif problem:
            test_problems.append(f"{path}: {problem}")
    if test_problems:
        raise DataError(
            "unreadable test images (each one must be predicted):\n  "
            + "\n  ".join(test_problems[:10])
            + "\nRe-extract images/test-resized from the course's zip file."
        )
    limit = max(5, int(max_skip_fraction * max(len(label_stems), 1)))
    if len(skip) > limit:
        raise DataError(
            f"{len(skip)} of {len(label_stems)} training images are missing or "
            f"unreadable (more than {limit}): the data folder looks incomplete. "
            "First problems:\n  " + "\n  ".join(r for r in report if r.startswith("skipped"))[:2000]
        )
    return {"skip": skip, "report": report}


def stems(dataset) -> list[str]:
    """The image ids of a course dataset, in its order (file names without extension)."""
    names = dataset.img_labels if hasattr(dataset, "img_labels") else dataset.img_list
    return [Path(n).stem for n in names]


def labels_of(dataset, notes: list | None = None) -> np.ndarray:
    """The ``(N, 80)`` label matrix of a :class:`helpers.COCOTrainImageDataset`, read once."""
    return read_label_matrix(dataset.annotations_dir, dataset.img_labels, notes)


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
        self.stems = [stems(base)[i] for i in self.indices]

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


def report_data(scan: dict, label_notes, log=print, limit: int = 10) -> None:
    """Print what the start-up scan and the label reader noticed, before any training starts."""
    notes = scan["report"] + [f"{f}: {n}" for f, n in label_notes]
    if not notes:
        return
    log(f"data check: {len(notes)} remarks ({len(scan['skip'])} training images left out):")
    for line in notes[:limit]:
        log(f"  {line}")
    if len(notes) > limit:
        log(f"  ... and {len(notes) - limit} more")


def with_transform(dataset, transform):
    """A shallow copy of a dataset with another transform (the original is left untouched)."""
    out = type(dataset).__new__(type(dataset))
    out.__dict__.update(dataset.__dict__)
    out.transform = transform
    return out


def data_fingerprint(train_set, labels: np.ndarray, test_set) -> str:
    """A digest of what a run learns from and predicts: ids, labels and image file sizes.

    Stored with the split and every model, so that a run folder is never reused on other
    data. File sizes stand for the image content (a re-encoded or replaced JPEG changes size)
    at the cost of one ``stat`` per file, where hashing 65,000 images would take minutes.
    """
    import hashlib

    h = hashlib.sha256()
    for folder, names in (
        (train_set.img_dir, [f"{s}.jpg" for s in stems(train_set)]),
        (test_set.img_dir, test_set.img_list),
    ):
        for name in names:
            h.update(f"{name}:{os.stat(Path(folder) / name).st_size};".encode())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:16]
