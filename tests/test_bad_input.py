"""The damage a student's data and hands produce, found before training, named, and answered."""

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import helpers as h
from cocochallenge import data, files, handin, scan, split, submission
from conftest import load_run_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_scan_cache(tmp_path, monkeypatch):
    """Each test remembers image verdicts in its own folder, never in the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture()
def root(tmp_path, demo_root):
    """A private, writable copy of the demo data to damage."""
    out = tmp_path / "ms-coco"
    shutil.copytree(demo_root, out)
    return out


def _corrupt_middle(path: Path, seed: int = 0) -> None:
    """Random bytes over the middle third: the start and end markers stay, the decoder fails.

    Some random bytes still decode (into garbage); the first seed from ``seed`` whose bytes
    make the file undecodable is kept, as a damaged download would be.
    """
    raw = bytes(path.read_bytes())
    n = len(raw)
    for s in range(seed, seed + 50):
        rng = random.Random(s)
        damaged = (
            raw[: n // 3] + bytes(rng.getrandbits(8) for _ in range(n // 3)) + raw[2 * n // 3 :]
        )
        path.write_bytes(damaged)
        if not _decodes(path):
            break
    assert damaged[:2] == b"\xff\xd8" and damaged[-2:] == b"\xff\xd9"  # a header look passes it


def _first(root, folder="images/train-resized", suffix=".jpg"):
    return sorted((root / folder).glob(f"*{suffix}"))[0]


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except OSError:
        return False


def test_training_image_with_a_corrupt_middle_is_skipped_and_named(root, tmp_path):
    bad = _first(root)
    _corrupt_middle(bad)
    assert not _decodes(bad)  # the DataLoader would crash on it
    lines = []
    run = load_run_data(root, tmp_path / "split.json", 0.2, log=lines.append)
    assert bad.stem in run.scan["skip"] and bad.stem not in run.stems
    assert any(str(bad) in line and "corrupt JPEG" in line for line in lines)
    assert run.scan["counts"]["unreadable training images"] == 1
    for i in range(len(run.train)):  # every image left decodes
        run.train[i]


def test_test_image_with_a_corrupt_middle_stops_before_training(root):
    bad = _first(root, "images/test-resized")
    _corrupt_middle(bad, seed=1)
    assert not _decodes(bad)
    with pytest.raises(data.DataError) as err:
        scan.scan_data(root)
    msg = str(err.value)
    assert str(bad) in msg and "Nothing was trained" in msg and "test-resized" in msg
    assert ".cls" not in msg  # a test image has no label file to delete


def test_verdicts_are_remembered_until_a_file_changes(root):
    first = scan.scan_data(root)
    n_files = sum(first["counts"][k] for k in ("train images", "test images"))
    assert first["decoded"] == n_files
    again = scan.scan_data(root)
    assert again["decoded"] == 0 and again["skip"] == first["skip"]
    relative = Path(os.path.relpath(root))  # the same folder by another path: still remembered
    assert scan.scan_data(relative)["decoded"] == 0
    bad = _first(root)
    _corrupt_middle(bad)  # same name, new content: decoded again, and caught
    third = scan.scan_data(root)
    assert third["decoded"] == 1 and bad.stem in third["skip"]


def test_scan_decodes_in_parallel_like_in_series(root, tmp_path):
    """Past 512 files the verdicts come from a process pool: the same ones as in series."""
    sources = sorted((root / "images/train-resized").glob("*.jpg"))
    _corrupt_middle(sources[0])
    many = tmp_path / "many"
    many.mkdir()
    for i in range(600):
        shutil.copy(sources[i % len(sources)], many / f"{i:012d}.jpg")
    names = sorted(many.iterdir())
    serial, _ = scan.check_images(names, workers=1)
    parallel, decoded = scan.check_images(names, workers=2)
    assert serial == parallel and decoded == 600
    assert sum(1 for problem, _ in parallel.values() if problem) == 600 // len(sources) + 1


def test_label_files_all_empty_stop_the_run(root, tmp_path):
    for f in (root / "labels/train").glob("*.cls"):
        f.write_text("")
    with pytest.raises(data.DataError, match="are empty: nothing to learn"):
        load_run_data(root, tmp_path / "split.json")


def test_many_empty_label_files_stop_and_a_few_are_counted(root, tmp_path):
    labels = sorted((root / "labels/train").glob("*.cls"))
    for f in labels[: len(labels) // 10]:  # 10% empty: the labels look damaged
        f.write_text("")
    with pytest.raises(data.DataError, match=r"label files .* are empty \(more than 5%\)"):
        load_run_data(root, tmp_path / "split.json")
    for f in labels[3 : len(labels) // 10]:
        f.write_text("1\n")
    lines = []
    run = load_run_data(root, tmp_path / "split.json", log=lines.append)
    assert (run.Y.sum(1) == 0).sum() == 3
    assert any("3 label files are empty" in line for line in lines)


def test_half_the_label_files_missing_stop_the_run(root):
    labels = sorted((root / "labels/train").glob("*.cls"))
    for f in labels[::2]:
        f.unlink()
    with pytest.raises(data.DataError, match="lack their label file"):
        scan.scan_data(root)


def test_a_changed_labelled_set_is_named_file_by_file(tmp_path):
    Y = np.eye(80, dtype=np.uint8)[np.arange(40) % 80]
    Y[:, 0] = 1
    stems = [f"{i:012d}" for i in range(40)]
    inv = {s: f"100:{i}" for i, s in enumerate(stems)}
    path = tmp_path / "split.json"
    split.load_or_make_split(stems, Y, path, 0.25, 0, inv)
    new = dict(inv)
    del new[stems[0]]
    new[stems[5]] = "999:5"
    new["000000009999"] = "50:1"
    files.save_json({}, tmp_path / "models/efficientnet_lite0/result.json")  # a model used it
    with pytest.raises(files.StaleRunError) as err:
        split.load_or_make_split(list(new), Y[: len(new)], path, 0.25, 0, new)
    msg = str(err.value)
    assert "1 added (e.g. 000000009999)" in msg and "1 removed (e.g. 000000000000)" in msg
    assert "1 changed (e.g. 000000000005)" in msg and '"retrain": ["all"]' in msg


def test_a_changed_test_folder_rescores_the_test_images_only(tmp_path, demo_root):
    """The notebook's cells twice: after a test image is removed, the second run trains
    nothing, keeps the split, and scores the new test folder with the kept model."""
    from test_robustness import _driver

    root = tmp_path / "ms-coco"
    shutil.copytree(demo_root, root)
    run_dir = tmp_path / "run"
    quick = {"COCO_EPOCHS_FROZEN": "1", "COCO_EPOCHS_FINETUNE": "1"}
    out = subprocess.run(**_driver(tmp_path, root, run_dir, until=None, **quick),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert "FINISHED" in out.stdout, out.stderr[-2000:]
    split_before = (run_dir / "split.json").read_text()
    gone = _first(root, "images/test-resized")
    gone.unlink()
    out = subprocess.run(**_driver(tmp_path, root, run_dir, until=None, **quick),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert "FINISHED" in out.stdout, out.stderr[-2000:]
    assert "new test images scored by the kept model" in out.stdout
    assert not re.search(r"(frozen_mlp|frozen_linear|finetune)  1/1", out.stdout)
    assert (run_dir / "split.json").read_text() == split_before
    sub = submission.read_submission(run_dir / "submission.json")
    assert gone.stem not in sub and len(sub) == len(list((root / "images/test-resized").iterdir()))


@pytest.mark.parametrize(
    "text,expected",
    [
        ('{"000000000001": [1],}', "line 1, column 22"),
        ("{'000000000001': [1]}", "double quotes"),
        ('{"000000000001": [1], "000000000002": [', "ends too early"),
        ("", "the file is empty"),
        ('{"000000000001": [1],\n "000000000001": [2]}', "duplicate image ids ['000000000001']"),
        ('{"000000000001": [1]} \xe9'.encode("latin-1"), "not UTF-8 text"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_broken_submission_files_are_said_in_one_line(tmp_path, text, expected):
    path = tmp_path / "submission.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(submission.SubmissionError) as err:
        submission.read_submission(path)
    assert expected in str(err.value) and "\n" not in str(err.value)
    out = subprocess.run([sys.executable, "-m", "cocochallenge", "validate", str(path),
                          str(tmp_path)], capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 1 and expected in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def _run_folder(tmp_path, sub: dict, with_summary: bool):
    """A finished run folder whose notebooks and files are in order (see test_handin.py)."""
    from test_handin import _notebook

    test_dir = tmp_path / "data" / "images" / "test-resized"
    test_dir.mkdir(parents=True)
    for stem in ("000000000001", "000000000002"):
        (test_dir / f"{stem}.jpg").write_bytes(b"x")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("challenge.ipynb", "analysis.ipynb"):
        _notebook(run_dir / name, run_dir)
    (run_dir / "submission.json").write_text(json.dumps(sub))
    files.save_json({"data_root": str(tmp_path / "data")}, run_dir / "config.json")
    if with_summary:
        files.save_json({"data_root": str(tmp_path / "data")}, run_dir / "summary.json")
    files.save_json({}, run_dir / "environment.json")
    (run_dir / "results.csv").write_text("model,f1\nx,0.5\n")
    return run_dir


def test_handin_checks_missing_test_ids_even_without_summary(tmp_path):
    run_dir = _run_folder(tmp_path, {"000000000001": [0]}, with_summary=False)
    lines = []
    assert handin.pack(run_dir, log=lines.append) is None
    assert any("1 test images have no prediction" in line for line in lines)


def test_handin_says_plainly_when_it_cannot_check_the_test_ids(tmp_path):
    run_dir = _run_folder(tmp_path, {"000000000001": [0], "000000000002": [1]}, False)
    files.save_json({"data_root": str(tmp_path / "elsewhere")}, run_dir / "config.json")
    lines = []
    assert handin.pack(run_dir, log=lines.append) is not None
    said = "\n".join(lines)
    assert "NOT CHECKED" in said and "not on this machine" in said and "--test-dir" in said


def test_handin_refuses_duplicate_ids(tmp_path):
    run_dir = _run_folder(tmp_path, {}, with_summary=True)
    (run_dir / "submission.json").write_text('{"000000000001": [0], "000000000001": [1]}')
    lines = []
    assert handin.pack(run_dir, log=lines.append) is None
    assert any("duplicate image ids" in line for line in lines)


def test_a_split_that_cannot_hold_every_class_warns_and_goes_on():
    """Classes on {A,B}, {A,C}, {B,C}: no split puts each on both sides. The split warns with
    their names instead of failing, and never grows validation past 1.5x the fraction."""
    Y = np.zeros((3, 80), np.uint8)
    Y[0, [1, 2]] = Y[1, [1, 3]] = Y[2, [2, 3]] = 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr, va = split.stratified_split(Y, 0.34, seed=0)
    assert len(tr) + len(va) == 3 and len(va) >= 1
    assert any("one side of the split only" in str(w.message) for w in caught)
    rng = np.random.default_rng(0)
    Y = (rng.random((56, 80)) < 0.04).astype(np.uint8)  # tiny and spread: many rare classes
    Y[:, 0] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr, va = split.stratified_split(Y, 0.1, seed=0)
    assert len(va) <= max(int(1.5 * 0.1 * 56), 6 + 2), len(va)


@pytest.mark.parametrize("backbones", [[], ["--backbones", "efficientnet_lite0"]])
def test_run_py_says_a_data_error_in_a_few_lines(tmp_path, backbones):
    """A wrong --data-root: the message and its fix, not a kernel traceback (CPU recipe and
    notebook alike)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCO_")}
    args = [sys.executable, "run.py", "--data-root", str(tmp_path / "nowhere"), "--run-dir",
            str(tmp_path / "run"), *backbones]  # fmt: skip
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    err = out.stderr
    assert "DataError" in err and "does not exist" in err and "Traceback" not in err
    assert "\x1b[" not in err and len(err.strip().splitlines()) <= 15, err


def test_course_dataset_reads_an_empty_label_file(root):
    """The course's dataset, completed: an empty label file is an all-zero target."""
    f = _first(root, "labels/train", ".cls")
    f.write_text("")
    ds = h.COCOTrainImageDataset(root / "images/train-resized", root / "labels/train")
    assert ds[data.stems(ds).index(f.stem)][1].sum() == 0


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cocochallenge", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_validate_and_handin_say_a_wrong_test_folder_in_words(tmp_path):
    """A test folder that is missing, a file or empty: never a traceback, never "valid"."""
    run_dir = _run_folder(tmp_path, {"000000000001": [0], "000000000002": [1]}, True)
    sub = run_dir / "submission.json"
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    for folder, said in (("nowhere", "does not exist"), ("a-file", "is a file"),
                         ("empty", "holds no .jpg image")):  # fmt: skip
        out = _cli("validate", sub, tmp_path / folder)
        assert out.returncode == 1 and said in out.stderr and "Traceback" not in out.stderr
        out = _cli("handin", run_dir, "--test-dir", tmp_path / folder)
        assert out.returncode == 1 and "hand-in NOT written" in out.stdout, out.stderr
        assert "Traceback" not in out.stderr
    (sub).write_text("{}")
    out = _cli("validate", sub, tmp_path / "empty")
    assert out.returncode == 1 and "valid" not in out.stdout


def test_handin_names_a_damaged_config_json(tmp_path):
    """The run's config.json cut off, and no summary.json: the hand-in names the file."""
    run_dir = _run_folder(tmp_path, {"000000000001": [0], "000000000002": [1]}, False)
    config = run_dir / "config.json"
    config.write_text(config.read_text()[:10])
    out = _cli("handin", run_dir)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"{config} is damaged" in out.stdout and "run the challenge notebook" in out.stdout


def test_run_py_stops_at_once_on_a_folder_another_run_holds(tmp_path):
    """A second run.py (or a notebook and run.py) on one folder: stopped before any kernel
    starts, with the holder named; nothing written."""
    holder = subprocess.Popen(["sleep", "60"])
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        lock = {"host": socket.gethostname(), "pid": holder.pid, "since": 0, "program": "x",
                "started": files._process(holder.pid)[1]}  # fmt: skip
        (run_dir / files.LOCK_NAME).write_text(json.dumps(lock))
        env = {k: v for k, v in os.environ.items() if not k.startswith("COCO_")}
        args = [sys.executable, "run.py", "--run-dir", str(run_dir), "--smoke"]
        out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "RunFolderBusy" in out.stderr and f"process {holder.pid} on" in out.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [files.LOCK_NAME]
