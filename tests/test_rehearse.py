"""tools/rehearse.py: the rehearsal's data (links, ids, labels, reuse) and its stage table.

The data part runs at a tiny size on the real photos beside the checkout (skipped when they are
absent); the stage table on a synthetic executed notebook. Nothing here trains.
"""

import importlib.util
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_TRAIN = Path(os.environ.get("COCO_REAL_TRAIN", ROOT.parent / "shared" / "real-coco-train"))

pytestmark = pytest.mark.quick


def _load():
    spec = importlib.util.spec_from_file_location("rehearse", ROOT / "tools" / "rehearse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rehearse = _load()


@pytest.fixture(scope="module")
def source():
    src = REAL_TRAIN / "ms-coco"
    if not (src / "labels" / "train").is_dir():
        pytest.skip(f"real photos not found at {REAL_TRAIN}")
    return src


def test_data_are_links_under_fresh_ids_with_their_photos_labels(source, tmp_path):
    manifest = rehearse.build_data(source, tmp_path, 300, 40, log=lambda _: None)
    data = tmp_path / "ms-coco"
    train = sorted((data / "images" / "train-resized").iterdir())
    test = sorted((data / "images" / "test-resized").iterdir())
    labels = sorted((data / "labels" / "train").iterdir())
    assert (len(train), len(test), len(labels)) == (300, 40, 300)
    assert [p.stem for p in labels] == [p.stem for p in train]
    originals = {
        os.stat(p).st_ino: p
        for sub in ("train-resized", "test-resized")
        for p in (source / "images" / sub).glob("*.jpg")
    }
    source_ids = {p.stem for p in originals.values()}
    ids = [p.stem for p in train + test]
    assert all(len(i) == 12 and i.isdigit() for i in ids)
    assert len(set(ids)) == 340 and not set(ids) & source_ids  # fresh, no collision
    assert not {p.stem for p in train} & {p.stem for p in test}
    for image in train:
        assert manifest["method"] == "hard links"  # one file system here: never copies
        photo = originals[os.stat(image).st_ino]  # the same inode as a source photo
        cls = data / "labels" / "train" / f"{image.stem}.cls"
        assert cls.read_bytes() == (source / "labels" / "train" / f"{photo.stem}.cls").read_bytes()
    assert all(os.stat(p).st_ino in originals for p in test)
    assert manifest["reused"] is False and "never accuracy" in manifest["note"]


def test_copies_when_links_fail(source, tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    said = []
    monkeypatch.setattr(rehearse.os, "link", no_link)
    manifest = rehearse.build_data(source, tmp_path, 20, 5, log=said.append)
    image = next((tmp_path / "ms-coco" / "images" / "train-resized").iterdir())
    assert manifest["method"] == "copies" and os.stat(image).st_nlink == 1
    assert sum("copying" in line for line in said) == 1


def test_data_are_reused_at_the_same_sizes_and_rebuilt_otherwise(source, tmp_path):
    quiet = dict(log=lambda _: None)
    rehearse.build_data(source, tmp_path, 30, 6, **quiet)
    first = tmp_path / "ms-coco" / "images" / "train-resized" / "900000000000.jpg"
    stamp = first.stat().st_ctime_ns
    time.sleep(0.01)
    again = rehearse.build_data(source, tmp_path, 30, 6, **quiet)
    assert again["reused"] is True and first.stat().st_ctime_ns == stamp  # untouched
    other = rehearse.build_data(source, tmp_path, 31, 6, **quiet)
    assert other["reused"] is False
    assert len(list((tmp_path / "ms-coco" / "labels" / "train").iterdir())) == 31
    first.unlink()  # a damaged folder is not taken for a whole one
    assert rehearse.build_data(source, tmp_path, 31, 6, **quiet)["reused"] is False


def test_data_never_go_into_the_repository_nor_over_foreign_folders(source, tmp_path, monkeypatch):
    monkeypatch.setattr(rehearse, "ROOT", tmp_path / "repo")  # a broken check: not in ours
    with pytest.raises(SystemExit, match="inside the repository"):
        rehearse.build_data(source, tmp_path / "repo" / "data" / "rehearsal", 10, 2)
    assert not (tmp_path / "repo").exists()
    (tmp_path / "ms-coco").mkdir()  # someone's data, no manifest: never deleted
    with pytest.raises(SystemExit, match="not a rehearsal's"):
        rehearse.build_data(source, tmp_path, 10, 2)


def _cell(kind, source, start=None, seconds=0.0, error=None):
    end = None if start is None else start + seconds
    cell = {"cell_type": kind, "source": source, "metadata": {}, "outputs": []}
    if start is not None:
        iso = [datetime.fromtimestamp(s, timezone.utc).isoformat() for s in (start, end)]
        cell["metadata"]["papermill"] = {"start_time": iso[0], "end_time": iso[1]}  # as papermill
    if error:
        cell["outputs"] = [{"output_type": "error", "ename": error, "evalue": "boom"}]
    return cell


def test_cells_become_sections_and_samples_become_each_sections_peak():
    t = 1_700_000_000
    nb = {
        "cells": [
            _cell("markdown", "# Title"),
            _cell("markdown", "## 1. Imports\nprose"),
            _cell("code", "import os", t, 2),
            _cell("markdown", "## 2. Training\nprose\n### a sub-heading stays in section 2"),
            _cell("code", "\ntrain()", t + 2, 10),
            _cell("markdown", "prose without a heading"),
            _cell("code", "more()", t + 13, 5, error="RuntimeError"),
            _cell("code", "never_ran()"),
        ]
    }
    cells = rehearse.notebook_cells(nb, "challenge")
    assert [c["stage"] for c in cells] == ["challenge: 1. Imports"] + ["challenge: 2. Training"] * 2
    assert cells[1]["first_line"] == "train()" and cells[2]["error"] == "RuntimeError: boom"
    stages = rehearse.sections(cells)
    assert [(s["stage"], s["seconds"]) for s in stages] == [
        ("challenge: 1. Imports", 2),
        ("challenge: 2. Training", 16),  # its first start to its last end, the gap included
    ]
    # (time, rss_kb, pss_kb, processes); the 9,999 MB sample is outside every window
    samples = [(t + 1, 1024, 512, 1), (t + 5, 4096, 2048, 3), (t + 14, 2048, 1024, 2)]
    samples.append((t + 40, 9999 * 1024, 0, 1))
    got = rehearse.peaks(stages, samples)
    assert [(s["peak_rss_mb"], s["peak_pss_mb"]) for s in got] == [(1, 0.5), (4, 2)]
    short = {"stage": "short", "start": t + 5.2, "end": t + 5.3, "seconds": 0.1}
    assert rehearse.peaks([short], samples)[0]["peak_rss_mb"] is None  # no sample: no figure
    between = {"stage": "run.py", "start": t - 10, "end": t + 50, "seconds": 0}
    assert rehearse.peaks([between], samples, skip=stages)[0]["peak_rss_mb"] == 9999
    printed = rehearse.table([*got, rehearse.peaks([short], samples)[0]], memory=True)
    assert printed.splitlines()[2].split() == ["challenge:", "2.", "Training", "16.0", "4", "2"]
    assert printed.splitlines()[3].split() == ["short", "0.1", "-", "-"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc: no memory figures")
def test_the_memory_of_a_child_process_is_counted():
    alone = rehearse.tree_memory(os.getpid())
    code = "b = b'x' * (200 * 2**20); import time; time.sleep(30)"  # every page written
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(200):  # until the child has written its 200 MB
            rss, pss, n = rehearse.tree_memory(os.getpid())
            if min(rss - alone[0], pss - alone[1]) > 190 * 1024:
                break
            time.sleep(0.05)
        assert n == alone[2] + 1
        assert min(rss - alone[0], pss - alone[1]) > 190 * 1024
    finally:
        child.kill()
        child.wait()


def test_disk_counts_a_linked_file_once_and_by_kind(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "features_train.pt").write_bytes(b"x" * 2**20)
    os.link(tmp_path / "m" / "features_train.pt", tmp_path / "m" / "features_again.pt")
    (tmp_path / "m" / "frozen_best.pt").write_bytes(b"x" * 2**20)
    usage = rehearse.disk_usage(tmp_path)
    assert round(usage["feature caches"]) == 1 and round(usage["checkpoints"]) == 1
    assert rehearse.disk_usage(tmp_path, linked_too=False).get("feature caches", 0) == 0


def test_the_training_cell_is_split_by_the_files_each_backbone_writes(tmp_path):
    t = 1_700_000_000
    written = {
        "a": {"settings.json": 0, "features_val.pt": 10, "frozen_last.pt": 13,
              "finetune_last.pt": 40, "result.json": 45},
        "b": {"settings.json": 1, "features_val.pt": 50, "frozen_last.pt": 52,
              "result.json": 53},  # written up front; no fine-tuning
    }  # fmt: skip
    for backbone, files in written.items():
        (tmp_path / "models" / backbone).mkdir(parents=True)
        for name, seconds in files.items():
            path = tmp_path / "models" / backbone / name
            path.write_text("")
            os.utime(path, (t + seconds, t + seconds))
    parts = [(p["stage"], p["seconds"]) for p in rehearse.training_parts(tmp_path)]
    assert parts == [
        ("a: features", 10),
        ("a: frozen head", 3),
        ("a: fine-tuning", 27),
        ("a: validation and test scores", 5),
        ("b: features", 5),  # from a's end, not from b's settings.json
        ("b: frozen head", 2),
        ("b: validation and test scores", 1),
    ]
