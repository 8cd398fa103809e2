"""The start-up scan: every image of a challenge folder decoded once, before any training.

A JPEG whose middle is corrupt keeps its start and end markers, so a look at a file's first
and last bytes passes it, and the run then dies inside the DataLoader, or (a test image) after
a backbone has trained. Decoding every file is the only check that cannot be fooled. It costs
about a millisecond an image on one core, so it runs on all the cores, and each file's verdict
is remembered by its size and modification time: a rerun on the same folder decodes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from .config import progress
from .data import DataError, check_data_root, list_files
from .files import save_json

_IMAGE_MAGIC = {b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WEBP",
                b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}  # fmt: skip
#: Bumped when the verdicts' meaning changes, so that old cache files are not trusted.
VERDICT_VERSION = 4
#: The longest side an image may have. The course's images are at most 224 px: a far larger
#: file is not one of them, and decoding it costs seconds and gigabytes (PIL itself warns from
#: 89 million pixels, and refuses 179 million with a DecompressionBombError).
MAX_IMAGE_SIDE = 4096
TOO_LARGE = (f"over the limit of {MAX_IMAGE_SIDE} px a side: not one of the course's images "
             "(at most 224 px)")  # fmt: skip


def check_image_file(path: Path | str) -> tuple[str | None, str | None]:
    """``(problem, note)`` of one image, decoded in full.

    ``problem`` says why the file cannot be used (the caller skips it or stops); ``note`` says
    what is unusual about a file that decodes (a PNG named .jpg: used; a 16-bit one is scaled to
    8 bits by the datasets, ``helpers._rgb``).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)", None
        with open(path, "rb") as fh:
            head = fh.read(4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # said below
            with Image.open(path) as img:
                if max(img.size) > MAX_IMAGE_SIDE:
                    return f"{img.size[0]}x{img.size[1]} pixels, {TOO_LARGE}", None
                img.load()
                deep = ", 16-bit grayscale: scaled to 8 bits" if img.mode.startswith("I") else ""
    except Image.DecompressionBombError as err:  # PIL refuses it before reading its size
        pixels = re.search(r"\d+ pixels", str(err))
        return f"{pixels[0] if pixels else 'too many pixels'}, {TOO_LARGE}", None
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, OSError) and not path.is_file():
            return f"cannot be opened ({err})", None
        what = "truncated or corrupt JPEG" if head[:2] == b"\xff\xd8" else "not an image"
        return f"{what} ({err})", None
    if head[:2] != b"\xff\xd8":
        kind = next((v for k, v in _IMAGE_MAGIC.items() if head.startswith(k)), "other format")
        return None, f"not a JPEG despite its name ({kind}{deep}), but readable: used"
    return None, None


def _check_many(paths: list[str]) -> list[tuple[str | None, str | None]]:
    return [check_image_file(p) for p in paths]


def cache_file(root: Path | str) -> Path:
    """Where the verdicts of one data folder are kept: the user's cache, not the data folder."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cocochallenge"
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return base / f"scan-{key}.json"


def check_images(files: list[Path], cache: Path | None = None, workers: int | None = None,
                 show_progress: bool = False) -> tuple[dict, int]:  # fmt: skip
    """``({path: (problem, note)}, decoded)``: remembered verdicts, the rest decoded in parallel.

    A verdict is reused only for a file of the same size and modification time (a replaced or
    re-extracted file is decoded again). ``cache`` is rewritten with the verdicts of ``files``.
    """
    stats, out = {}, {}
    for f in files:
        try:
            stats[str(f)] = os.stat(f)
        except OSError as err:  # a link to nothing, a link loop
            out[str(f)] = (f"cannot be opened ({err.strerror})", None)
    saved = {}
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            saved = data["verdicts"] if data.get("version") == VERDICT_VERSION else {}
        except (OSError, ValueError, KeyError):
            saved = {}  # an unreadable cache is only a slower scan
    todo = []
    where = {name: os.path.abspath(name) for name in stats}  # the same file, however reached
    for name, st in stats.items():
        old = saved.get(where[name])
        if old and old[0] == st.st_size and old[1] == st.st_mtime_ns:
            out[name] = (old[2], old[3])
        else:
            todo.append(name)
    workers = workers or min(8, os.cpu_count() or 1)
    chunks = [todo[i : i + 256] for i in range(0, len(todo), 256)]
    if workers > 1 and len(todo) > 512:
        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(_check_many, chunks)
            for chunk, verdicts in zip(
                chunks,
                progress(
                    results, show_progress, total=len(chunks), desc="decode images", leave=False
                ),
            ):
                out.update(zip(chunk, verdicts))
    else:
        for chunk in progress(chunks, show_progress, desc="decode images", leave=False):
            out.update(zip(chunk, _check_many(chunk)))
    if cache is not None and todo:
        verdicts = {where[n]: [stats[n].st_size, stats[n].st_mtime_ns, *out[n]] for n in stats}
        try:
            save_json({"version": VERDICT_VERSION, "verdicts": verdicts}, cache, indent=None)
        except OSError:
            pass  # a cache that cannot be written is only a slower scan next time
    return out, len(todo)


def scan_data(root: Path | str, max_skip_fraction: float = 0.01, cache: bool = True,
              workers: int | None = None, show_progress: bool = False) -> dict:  # fmt: skip
    """Look at every file of a challenge folder before training; stop or skip, never crash later.

    Stops with a :class:`DataError` (results would be wrong, or the run would die hours in):
    test names that are not 12-digit ids, test images that are also training images, a test
    image that does not decode (every test image must be predicted), and more than
    ``max_skip_fraction`` of the training images unusable (unreadable, or without a label file)
    or of the label files without an image: a bad unzip, the wrong folder. Skips, with a
    visible report: a handful of unreadable training images and label files whose image is
    missing. Label content is checked when the labels are read (``data.labels_of``).
    Returns ``{"skip": training stems to leave out, "report": [lines], "counts": {...},
    "decoded": files decoded (the others' verdicts were remembered), "seconds": ...}``.
    """
    t0 = time.perf_counter()
    paths = check_data_root(root)
    label_stems = [n[:-4] for n in list_files(paths["train_labels"], ".cls")]
    train_imgs = {n[:-4] for n in list_files(paths["train_images"], ".jpg")}
    test_stems = [n[:-4] for n in list_files(paths["test_images"], ".jpg")]
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
        report.append(f"{len(unlabelled)} training images have no label file and are not used, "
                      f"e.g. {unlabelled[:3]}")  # fmt: skip
    missing = [s for s in label_stems if s not in train_imgs]
    for s in missing:
        report.append(f"skipped {paths['train_labels'] / (s + '.cls')}: its image {s}.jpg is "
                      "missing")  # fmt: skip
    skip.update(missing)
    train_files = [paths["train_images"] / f"{s}.jpg" for s in label_stems if s in train_imgs]
    test_files = [paths["test_images"] / f"{s}.jpg" for s in test_stems]
    verdicts, decoded = check_images(
        train_files + test_files, cache_file(root) if cache else None, workers, show_progress
    )
    unreadable, test_problems = [], []
    for path in train_files + test_files:
        problem, note = verdicts[str(path)]
        if note:
            report.append(f"{path}: {note}")
        if problem and path.parent == paths["train_images"]:
            skip.add(path.stem)
            unreadable.append(path.stem)
            report.append(f"skipped {path}: {problem}")
        elif problem:
            test_problems.append(f"{path}: {problem}")
    if test_problems:
        raise DataError(
            f"{len(test_problems)} test images cannot be used, and every test image must be "
            "predicted:\n  "
            + "\n  ".join(test_problems[:10])
            + "\nNothing was trained. Re-extract images/test-resized from the course's zip "
            "file, then run again."
        )
    n_images = max(len(train_imgs), len(label_stems), 1)
    limit = max(5, int(max_skip_fraction * n_images))
    for what, count, fix in (
        ("training images are unreadable or lack their label file",
         len(unreadable) + len(unlabelled), "re-extract images/train-resized and labels/train"),
        ("label files have no image", len(missing), "re-extract images/train-resized"),
    ):  # fmt: skip
        if count > limit:
            examples = "\n  ".join(r for r in report if r.startswith(("skipped", f"{count} ")))
            raise DataError(
                f"{count} of {n_images} {what} (more than {limit}, {max_skip_fraction:.0%}): "
                f"the data folder looks incomplete; {fix} from the course's zip file. "
                f"First problems:\n  {examples[:2000]}"
            )
    counts = {"train images": len(train_imgs), "label files": len(label_stems),
              "test images": len(test_stems), "unreadable training images": len(unreadable),
              "images without a label file": len(unlabelled),
              "label files without an image": len(missing)}  # fmt: skip
    return {"skip": skip, "report": report, "counts": counts, "decoded": decoded,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def report_data(scan: dict, label_notes, log=print, limit: int = 10) -> None:
    """Print what the start-up scan and the label reader noticed, before any training starts."""
    shown = ", ".join(f"{v} {k}" for k, v in scan["counts"].items())
    log(f"data check: {shown} ({scan['decoded']} files decoded, the others remembered)")
    notes = scan["report"] + [f"{f}: {n}" for f, n in label_notes]
    for line in notes[:limit]:
        log(f"  {line}")
    if len(notes) > limit:
        log(f"  ... and {len(notes) - limit} more")
