"""The guards between a student's folders and a wasted run, each in a few milliseconds.

A wrongly unzipped data folder, an image that is not one of the course's, a damaged or
unwritable run-folder file, a broken submission and a second run on one folder are each
stopped in words (the file named, what to do), never after training and never with a
traceback. These are quick tests (``pytest -m quick``): ``tools/mutants.py`` breaks each guard
once and checks that one of them fails.
"""

import errno
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import helpers as h
from cocochallenge import checkpoints, cli, data, files, handin, runs, scan, split, submission
from conftest import write_labels

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.quick


@pytest.fixture()
def root(tmp_path):
    """A tiny challenge folder: 12 labelled training images, 3 test images."""
    out = tmp_path / "ms-coco"
    rng = np.random.default_rng(0)
    rows = {f"{i:012d}": [i % 3, 5] for i in range(1, 13)}
    write_labels(out / "labels/train", rows)
    tests = ["000000000101", "000000000102", "000000000103"]
    for folder, stems in (("train-resized", rows), ("test-resized", tests)):
        (out / "images" / folder).mkdir(parents=True)
        for stem in stems:
            pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(out / "images" / folder / f"{stem}.jpg")
    return out


def _scan(root):
    return scan.scan_data(root, cache=False)


def _first(root, folder="images/test-resized"):
    return sorted((root / folder).glob("*.jpg"))[0]


def _message(err) -> str:
    """What a student sees: the message alone in IPython (no traceback), no chained error."""
    assert err.value._render_traceback_() == [f"{type(err.value).__name__}: {err.value}"]
    assert err.value.__cause__ is None  # and no "During handling of ..., another exception"
    assert err.value.__context__ is None or err.value.__suppress_context__
    return str(err.value)


# ---- the data folder ----------------------------------------------------------------------
@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_data_root_is_an_error_not_demo_data(value, tmp_path):
    with pytest.raises(data.DataError) as err:
        data.resolve_data_root(value, tmp_path / "demo")
    assert "DATA_ROOT is empty" in _message(err) and not (tmp_path / "demo").exists()


def test_a_data_root_that_is_a_file_is_said_so(tmp_path):
    (tmp_path / "ms-coco.zip").write_bytes(b"PK")
    with pytest.raises(data.DataError) as err:
        data.check_data_root(tmp_path / "ms-coco.zip")
    assert "is a file, not a folder" in _message(err) and "unzip" in str(err.value)


def test_a_root_one_folder_too_deep_names_the_right_one(root, tmp_path):
    outer = tmp_path / "home"
    outer.mkdir()
    root.rename(outer / "ms-coco")
    with pytest.raises(data.DataError, match=f"set DATA_ROOT to {outer / 'ms-coco'}"):
        data.check_data_root(outer)


@pytest.mark.parametrize("folder", ["images/test-resized", "images/train-resized", "labels/train"])
def test_files_one_folder_too_deep_are_found_there(root, folder):
    path = root / folder
    inner = path / path.name
    inner.mkdir()
    for f in list(path.iterdir()):
        if f != inner:
            f.rename(inner / f.name)
    with pytest.raises(data.DataError) as err:
        _scan(root)
    assert f"but {inner} does: the files are one folder too deep" in _message(err)


def test_no_test_images_stop_before_training(root):
    for f in (root / "images/test-resized").iterdir():
        f.unlink()
    (root / "images/test-resized/notes.txt").write_text("x")
    with pytest.raises(data.DataError, match=r"test-resized holds no \.jpg files"):
        _scan(root)


@pytest.mark.parametrize("suffix", [".jpeg", ".JPG", ".png"])
@pytest.mark.parametrize("folder", ["images/test-resized", "images/train-resized"])
def test_images_named_otherwise_than_jpg_stop(root, folder, suffix):
    f = _first(root, folder)
    f.rename(f.with_suffix(suffix))
    with pytest.raises(data.DataError) as err:
        _scan(root)
    assert f"1 images in {root / folder} are not named <id>.jpg" in _message(err)
    assert f.stem + suffix in str(err.value)


# ---- images that are not the course's -----------------------------------------------------
def _claim_size(path: Path, width: int, height: int) -> None:
    """Rewrite a JPEG's frame header to claim another size: a huge image in a few bytes."""
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\xff\xc0")  # baseline frame: length (2), precision (1), height, width
    raw[at + 5 : at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("side", [5000, 12000, 15000])  # ours; PIL's warning; PIL's error
def test_an_oversized_test_image_is_named_in_words(root, side, recwarn):
    big = _first(root)
    _claim_size(big, side, side)
    with pytest.raises(data.DataError) as err:
        _scan(root)
    msg = _message(err)
    assert f"{big}: " in msg and "over the limit of 4096 px a side" in msg
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


def test_a_symlink_loop_named_jpg_is_named_in_words(root):
    loop = _first(root)
    loop.unlink()
    os.symlink(loop.name, loop)
    with pytest.raises(data.DataError) as err:
        _scan(root)
    assert f"{loop}: cannot be opened (Too many levels of symbolic links)" in _message(err)
    train = _first(root, "images/train-resized")
    train.unlink()
    os.symlink(train.name, train)
    loop.unlink()  # a training image: skipped and reported
    found = _scan(root)
    assert train.stem in found["skip"]


def _corrupt_middle(path: Path) -> None:
    """Random bytes over the middle third: the markers stay (a header look passes it), and
    decoding fails (the first of a few seeds whose bytes do not happen to decode)."""
    raw = path.read_bytes()
    n = len(raw)
    for seed in range(50):
        noise = np.random.default_rng(seed).integers(0, 256, n // 3, dtype=np.uint8).tobytes()
        path.write_bytes(raw[: n // 3] + noise + raw[n // 3 + len(noise) :])
        try:
            with Image.open(path) as img:
                img.load()
        except OSError:
            return
    raise AssertionError("no seed made the file undecodable")


def test_the_scan_decodes_every_image_in_full(root):
    """``verify()`` would pass this file: only a full decode finds a corrupt middle."""
    bad = _first(root)
    _corrupt_middle(bad)
    with Image.open(bad) as img:
        img.verify()  # what a cheaper check would see: nothing wrong
    problem, _ = scan.check_image_file(bad)
    assert problem and "corrupt JPEG" in problem


def test_a_test_image_that_does_not_decode_stops_before_training(root):
    bad = _first(root)
    _corrupt_middle(bad)
    with pytest.raises(data.DataError) as err:
        _scan(root)
    assert str(bad) in _message(err) and "Nothing was trained" in str(err.value)


# ---- labels -------------------------------------------------------------------------------
def _labelled(root):
    return h.COCOTrainImageDataset(root / "images/train-resized", root / "labels/train")


def test_label_files_all_empty_stop(root):
    for f in (root / "labels/train").glob("*.cls"):
        f.write_text("")
    with pytest.raises(data.DataError) as err:
        data.labels_of(_labelled(root))
    assert "are empty: nothing to learn" in _message(err)


def test_many_empty_label_files_stop_and_a_few_pass(root):
    labels = sorted((root / "labels/train").glob("*.cls"))
    for f in labels[:6]:  # 6 of 12: more than 5 and more than 5%
        f.write_text("")
    with pytest.raises(data.DataError, match=r"6 of 12 label files .* are empty \(more than 5%\)"):
        data.labels_of(_labelled(root))
    labels[0].write_text("1\n")
    notes = []
    assert (data.labels_of(_labelled(root), notes).sum(1) == 0).sum() == 5
    assert any("5 label files are empty" in note for _, note in notes)


# ---- writes that fail ---------------------------------------------------------------------
def _fail_on_write(monkeypatch, code: int, text: str):
    """Every new file fails: a read-only folder (as root, permissions would not stop a write)
    or a full disk."""

    def refuse(*args, **kwargs):
        raise OSError(code, text)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


@pytest.mark.parametrize(
    "code,text,advice",
    [
        (errno.EROFS, "Read-only file system", "set RUN_DIR to a folder of your own"),
        (errno.EACCES, "Permission denied", "set RUN_DIR to a folder of your own"),
        (errno.ENOSPC, "No space left on device", "the disk is full: free some space"),
    ],
)
def test_an_unwritable_run_folder_is_one_sentence(tmp_path, monkeypatch, code, text, advice):
    _fail_on_write(monkeypatch, code, text)
    for write in (
        lambda: files.save_json({"a": 1}, tmp_path / "run/config.json"),
        lambda: files.torch_save_atomic({"a": 1}, tmp_path / "run/frozen_last.pt"),
        lambda: files.hold_run_folder(tmp_path / "run"),
        lambda: files.hold_run_folder(tmp_path / "run", take=False),  # run.py, before a kernel
    ):
        with pytest.raises(files.CannotWrite) as err:
            write()
        msg = _message(err)
        assert f"cannot write {tmp_path / 'run'}/" in msg and text in msg and advice in msg


def test_the_analysis_goes_on_where_the_run_folder_cannot_be_written(tmp_path, monkeypatch):
    """A teammate's run folder, read-only here: one note, then every figure and table is
    shown (the notebook's `show`) and none saved; a writable folder keeps both."""
    import pandas as pd
    from matplotlib.figure import Figure

    from cocochallenge import plots

    fig, table = Figure(), pd.DataFrame({"f1": [0.5]}, index=["x"])
    kept = plots.Outputs(tmp_path / "run")
    assert kept.figure(fig, "01") == tmp_path / "run/figures/01.png"
    assert kept.table(table, "t") == tmp_path / "run/tables/t.csv"
    assert kept.paths == [tmp_path / "run/figures/01.png", tmp_path / "run/tables/t.csv"]
    assert (tmp_path / "run/tables/t.csv").read_text() == ",f1\nx,0.5\n"
    _fail_on_write(monkeypatch, errno.EROFS, "Read-only file system")
    lines = []
    shown = plots.Outputs(tmp_path / "other", log=lines.append)
    assert shown.figure(fig, "01") is None and shown.table(table, "t") is None
    assert shown.figure(fig, "02", fmt="jpg") is None and shown.paths == []
    assert len(lines) == 1 and lines[0].startswith("note: the analysis goes on, its figures")
    assert f"cannot write {tmp_path / 'other/figures/01.png'} (Read-only file system)" in lines[0]


# ---- damaged run-folder files -------------------------------------------------------------
def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def test_damaged_run_files_are_named_with_what_to_do(tmp_path):
    run = tmp_path / "run"
    model = run / "models/efficientnet_lite0"
    files.save_json({"train": ["000000000001"] * 50, "val": []}, run / "split.json")
    files.torch_save_atomic({"epoch": 1}, model / "frozen_last.pt")
    files.save_npz(model / "val_scores.npz", probs=np.zeros((50, 80)))
    for path in (run / "split.json", model / "frozen_last.pt", model / "val_scores.npz"):
        _cut(path)
    with pytest.raises(files.CorruptFile) as err:
        split.load_or_make_split(["000000000001"], np.ones((1, 80)), run / "split.json")
    assert f"{run / 'split.json'} is damaged" in _message(err)
    assert "move it out of the run folder, then run the challenge notebook" in str(err.value)
    for read, path in (
        (lambda: checkpoints.PhaseCheckpoint(model, "frozen", {}).resume(), "frozen_last.pt"),
        (lambda: runs.load_scores(run, "efficientnet_lite0"), "val_scores.npz"),
    ):
        with pytest.raises(files.CorruptFile) as err:
            read()
        assert f"{model / path} is damaged" in _message(err)
        assert f"move the folder {model} out of the run folder" in str(err.value)


# ---- submissions --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw,expected",
    [
        ('{"000000000001": [1],\n "000000000001": [2]}', "duplicate image ids ['000000000001']"),
        ('{"000000000001": [1]} \xe9'.encode("latin-1"), "not UTF-8 text (byte 0xe9"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"000000000001": [' + "1" * 5000 + "]}", "holds a number too long to read"),
    ],
)
def test_broken_submission_files_are_refused_in_words(tmp_path, raw, expected):
    path = tmp_path / "submission.json"
    path.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    with pytest.raises(submission.SubmissionError) as err:
        submission.read_submission(path)
    assert expected in _message(err)


@pytest.mark.parametrize("folder", ["missing", "a file", "empty"])
def test_a_test_folder_that_is_not_one_is_said_so(tmp_path, folder):
    path = tmp_path / "test-resized"
    if folder == "a file":
        path.write_text("x")
    elif folder == "empty":
        path.mkdir()
    said = {"missing": "does not exist", "a file": "is a file", "empty": "holds no .jpg image"}
    for sub in ({}, {"000000000001": [1]}):
        with pytest.raises(submission.SubmissionError) as err:
            submission.validate_submission(sub, path)
        assert f"the test folder {path} {said[folder]}" in _message(err)


def test_an_empty_test_folder_argument_is_said_so(tmp_path, capsys):
    """`python -m cocochallenge validate sub.json ""`: os.scandir("") would raise."""
    path = tmp_path / "submission.json"
    path.write_text('{"000000000001": [1]}')
    assert cli.main(["validate", str(path), ""]) == 1
    err = capsys.readouterr().err
    assert err.startswith("the test folder is an empty name ('')") and err.count("\n") == 1


GOOD = '{"000000000001": [1], "000000000002": [3, 7]}'


@pytest.mark.parametrize(
    "sub,answers,expected",
    [
        ("[1, 2]", GOOD, "sub.json cannot be scored: the submission must be a JSON object"),
        (GOOD, "[[1]]", "answers.json cannot be scored: the answers must be a JSON object"),
        ('{"000000000001": "1"}', GOOD, "000000000001: value must be a list of class indices"),
        (GOOD, '{"000000000001": [100]}', "000000000001: [100] not class indices"),
        (GOOD, '{"000000000001": [1.5]}', "000000000001: [1.5] not class indices"),
        (GOOD, '{"x": [1]}', "key 'x' is not a 12-digit image id"),
        (GOOD, "{}", "the answers is empty"),
        (GOOD, None, "answers.json: cannot be read (No such file or directory)"),
        (GOOD, '{"000000000001": [1', "answers.json: not valid JSON"),
    ],
)
def test_score_says_malformed_input_in_one_line(tmp_path, capsys, sub, answers, expected):
    (tmp_path / "sub.json").write_text(sub)
    if answers is not None:
        (tmp_path / "answers.json").write_text(answers)
    assert cli.main(["score", str(tmp_path / "sub.json"), str(tmp_path / "answers.json")]) == 1
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_answers_need_not_be_sorted_but_a_submission_must(tmp_path):
    answers = {"000000000001": [7, 3]}
    assert submission.score_submission({"000000000001": [3, 7]}, answers)["course_f1"] == 1
    with pytest.raises(submission.SubmissionError, match="must be sorted"):
        submission.score_submission(answers, answers)


def test_an_empty_submission_is_never_valid():
    with pytest.raises(submission.SubmissionError, match="the submission is empty"):
        submission.validate_submission({})


# ---- one run per run folder ---------------------------------------------------------------
def _lock(run_dir: Path, pid: int, started=None, host=None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": host or socket.gethostname(), "pid": pid, "started": started,
              "since": time.time() - 3720, "program": "run.py"}  # fmt: skip
    (run_dir / files.LOCK_NAME).write_text(json.dumps(holder))


@pytest.fixture()
def other_process():
    """A live process that is not this one, nor its parent."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_run_holds_its_folder_and_may_call_again(tmp_path):
    run_dir = tmp_path / "run"
    assert files.hold_run_folder(run_dir) is True
    assert files.hold_run_folder(run_dir) is False  # a cell run again in the same kernel
    assert json.loads((run_dir / files.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert files.held_note(run_dir) is None  # its own hold is no news to it
    files.release_run_folder(run_dir)
    assert not (run_dir / files.LOCK_NAME).exists()


def test_a_second_run_stops_at_once_and_readers_are_told(tmp_path, other_process):
    run_dir = tmp_path / "run"
    pid = other_process.pid
    _lock(run_dir, pid, started=files._process(pid)[1])
    for take in (True, False):
        with pytest.raises(files.RunFolderBusy) as err:
            files.hold_run_folder(run_dir, take=take)
        msg = _message(err)
        assert f"run.py (process {pid} on {socket.gethostname()}), since " in msg
        assert "(1 h 02 min ago)" in msg and f"kill {pid}" in msg and "RUN_DIR" in msg
    note = files.held_note(run_dir)
    assert note and f"process {pid}" in note and "run this again when it has finished" in note


def test_the_split_and_the_check_before_training_take_the_folder(tmp_path, other_process):
    """A run's first writes take the folder themselves: a second run stops before it writes."""
    run_dir = tmp_path / "run"
    stems, Y = [f"{i:012d}" for i in range(20)], np.eye(80)[np.arange(20) % 2]
    _lock(run_dir, other_process.pid, started=files._process(other_process.pid)[1])
    with pytest.raises(files.RunFolderBusy):
        split.load_or_make_split(stems, Y, run_dir / "split.json", 0.5)
    cfg = {"retrain": [], "run_dir": str(run_dir)}
    with pytest.raises(files.RunFolderBusy):
        runs.check_models(run_dir, [], cfg, {})
    assert sorted(p.name for p in run_dir.iterdir()) == [files.LOCK_NAME]  # nothing written
    (run_dir / files.LOCK_NAME).unlink()
    split.load_or_make_split(stems, Y, run_dir / "split.json", 0.5)
    assert json.loads((run_dir / files.LOCK_NAME).read_text())["pid"] == os.getpid()
    files.release_run_folder(run_dir)
    runs.check_models(run_dir, [], {**cfg, "seed": 0}, {})
    assert json.loads((run_dir / files.LOCK_NAME).read_text())["pid"] == os.getpid()
    files.release_run_folder(run_dir)


@pytest.mark.parametrize("case", ["ended", "id reused", "other server", "unreadable"])
def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, other_process, case):
    run_dir = tmp_path / "run"
    if case == "ended":
        gone = subprocess.Popen(["true"])
        gone.wait()
        _lock(run_dir, gone.pid)
    elif case == "id reused":  # the id now names a process that started after the lock's
        _lock(run_dir, other_process.pid, started=files._process(other_process.pid)[1] - 3600)
    elif case == "other server":  # even with a live process of that id here
        _lock(run_dir, os.getpid(), host="jupyter-team7-old")
    else:
        run_dir.mkdir()
        (run_dir / files.LOCK_NAME).write_text('{"host": ')
    assert files.held_note(run_dir) is None
    said = []
    assert files.hold_run_folder(run_dir, log=said.append) is True
    assert said and said[0].startswith(f"note: took over {run_dir} from ")
    why = {"ended": "runs on this server any more", "id reused": "is now another program",
           "other server": "ran on the server jupyter-team7-old",
           "unreadable": "unreadable"}  # fmt: skip
    assert why[case] in said[0]
    assert json.loads((run_dir / files.LOCK_NAME).read_text())["pid"] == os.getpid()
    files.release_run_folder(run_dir)


HOLDER = """
import sys
from cocochallenge import files
files.hold_run_folder(sys.argv[1])
print("held", flush=True)
sys.stdin.readline()
"""


def test_the_lock_is_released_when_its_holder_exits(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout.readline() == "held\n"
        with pytest.raises(files.RunFolderBusy, match=f"process {proc.pid} "):
            files.hold_run_folder(run_dir)
        lines = []
        assert handin.pack(run_dir, log=lines.append) is None  # nothing to pack, but it says so
        assert any(f"a training run still works in {run_dir}" in line for line in lines)
    finally:
        proc.communicate("\n", timeout=30)
    assert proc.returncode == 0 and not (run_dir / files.LOCK_NAME).exists()


#: An IPython shell, as a notebook's kernel runs cells: a cell holds the folder and waits for a
#: line; then the shell idles until another line; then a cell holds it and fails.
SHELL = """
import sys
from IPython.core.interactiveshell import InteractiveShell

shell = InteractiveShell.instance()
shell.run_cell("from cocochallenge import files, split")
cell = f"files.hold_run_folder({sys.argv[1]!r})\\nprint('cell runs', flush=True)\\n_ = input()"
shell.run_cell(cell)
print("idle", flush=True)
input()
shell.run_cell(f"files.hold_run_folder({sys.argv[1]!r})\\n1 / 0")
print("idle after an error", flush=True)
input()
"""


def test_a_kernel_holds_the_folder_while_a_cell_runs_not_while_it_idles(tmp_path):
    """The analysis and the hand-in say that a run still works while a training cell runs, never
    because a notebook's kernel is open; a second run stops only while that cell runs."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython")}
    proc = subprocess.Popen([sys.executable, "-c", SHELL, str(run_dir)], cwd=ROOT, text=True,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout.readline() == "cell runs\n"
        assert f"process {proc.pid} " in (files.held_note(run_dir) or "")
        with pytest.raises(files.RunFolderBusy):
            files.hold_run_folder(run_dir)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "idle\n"
        assert files.held_note(run_dir) is None and not (run_dir / files.LOCK_NAME).exists()
        proc.stdin.write("\n")
        proc.stdin.flush()
        said = iter(proc.stdout.readline, "")  # the error's traceback comes first
        assert "idle after an error\n" in said
        assert files.hold_run_folder(run_dir) is True  # free: this process takes it
        files.release_run_folder(run_dir)
    finally:
        proc.communicate("\n", timeout=30)
    assert proc.returncode == 0


def test_run_py_refuses_an_empty_data_root_and_gives_demo_data_by_name(capsys):
    import argparse

    import run

    with pytest.raises(SystemExit) as stop:
        run.main(["--data-root", " "])  # an empty shell variable
    assert stop.value.code == 2 and "--data-root is empty" in capsys.readouterr().err
    args = argparse.Namespace(smoke=False, data_root="demo", backbones=None, parameter=[],
                              run_dir=None)  # fmt: skip
    assert run.parameters_of(args)["DATA_ROOT"] == "demo"
    assert not run.uses_cpu_recipe(args, cuda=False)
