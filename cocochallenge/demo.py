"""Demo data: a challenge-layout dataset generated offline, deterministic from a seed.

The course images are licensed and not reachable everywhere (CI, a laptop, a reviewer's
machine). Every workflow must still run end to end, so this writes a small dataset in exactly
the challenge's layout. Class c is a coloured shape (shape c % 10 in colour c // 10), which a
model that works learns far above chance: the demo is also a check of the learning pipeline,
not only of the file handling.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .config import NUM_CLASSES

# Bumped whenever the drawing code changes, so a stale dataset made by an older
# generator is not mistaken for a complete current one (see the marker file).
_GENERATOR_VERSION = 1
_MARKER_NAME = ".demo_complete.json"
_OWNER_NAME = ".demo_owner"
_JPEG_QUALITY = 90
_LONG_SIDE = 224
_MIN_SHORT_SIDE = 59

# Class c is drawn as shape c % 10 in colour c // 10. Shapes and colours were
# chosen to be separable by both colour statistics and local structure, so
# that even a crude model learns them, yet a model must combine the two cues
# (colour alone or shape alone only narrows a class down to 10 or 8 choices).
DEMO_SHAPES = (
    "circle",
    "square",
    "triangle",
    "ring",
    "plus",
    "star",
    "stripes",
    "diamond",
    "hollow square",
    "x",
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
    for dx, dy in ((-half_x, -half_y), (half_x, -half_y), (half_x, half_y), (-half_x, half_y)):
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
        for ox, oy, half_x, half_y in (
            (0, -a + t, a, t),
            (0, a - t, a, t),
            (-a + t, 0, t, a),
            (a - t, 0, t, a),
        ):
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
    return {
        "generator_version": _GENERATOR_VERSION,
        "n_train": int(n_train),
        "n_test": int(n_test),
        "seed": int(seed),
    }


def make_demo_data(root, n_train=1000, n_test=200, seed=0, progress=True, replace=True):
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

    saved = None
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if (
            isinstance(saved, dict)
            and saved.get("params") == params
            and _count_managed(train_img_dir, ".jpg") == n_train
            and _count_managed(label_dir, ".cls") == n_train
            and _count_managed(test_img_dir, ".jpg") == n_test
            and (root / "test_labels.json").is_file()
        ):
            return {
                "root": str(root),
                "n_train": int(n_train),
                "n_test": int(n_test),
                "seconds": time.perf_counter() - t0,
                "class_counts": list(saved["class_counts"]),
            }

    # Delete only in a folder this generator made: pointed at real data by mistake, it must
    # not wipe it. The owner file is written before the first image, so an interrupted first
    # generation still counts as ours.
    owner = root / _OWNER_NAME
    ours = sum(
        _count_managed(f, sfx) > 0
        for f, sfx in ((train_img_dir, ".jpg"), (test_img_dir, ".jpg"), (label_dir, ".cls"))
    )
    if ours and not owner.is_file():
        raise ValueError(
            f"{root} holds images or labels that make_demo_data did not write (no {_OWNER_NAME}): "
            "refusing to delete them; give the demo data a folder of its own"
        )
    if isinstance(saved, dict) and saved.get("params") != params and not replace:
        raise ValueError(
            f"{root} holds a complete demo set made with other parameters "
            f"({marker.read_text().strip()[:200]}), which a run may have used: refusing to "
            f"replace it with {params}; give this run another demo folder (DEMO_DIR)"
        )
    root.mkdir(parents=True, exist_ok=True)
    owner.write_text(
        "Written by cocochallenge.demo.make_demo_data: this folder holds generated demo data.\n"
    )
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

    return {
        "root": str(root),
        "n_train": int(n_train),
        "n_test": int(n_test),
        "seconds": time.perf_counter() - t0,
        "class_counts": class_counts,
    }
