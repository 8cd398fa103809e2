"""Run-folder files: a full disk at any byte, damage anywhere, and nothing that runs when read.

Every writer of the run folder fails on a full disk with one sentence and keeps the previous
file, wherever in the file the disk fills (a fake disk here, a real small tmpfs where the
test may mount one). Every ``.pt`` file is read back with its size and checksum checked, and
unpickled with ``weights_only``: a cut, a changed byte, a file of an earlier version and a
planted payload are each named, and the payload never runs.
"""

import builtins
import errno
import io
import os
import pickle
import random
import subprocess
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cocochallenge import checkpoints, files, plots, split, submission, training  # noqa: E402

pytestmark = pytest.mark.quick
MODEL = "models/efficientnet_lite0"


def _said(err) -> str:
    """The message a student sees: the error alone, nothing chained."""
    assert err.value._render_traceback_() == [f"{type(err.value).__name__}: {err.value}"]
    assert err.value.__cause__ is None
    return str(err.value)


# ---- a full disk part-way through a file ---------------------------------------------------
class _Disk(io.FileIO):
    """A file on a disk with ``room`` bytes left: a write fills what is left (a short write, as
    the kernel does), the next one fails with ENOSPC."""

    room, then = 0, 0  # bytes left, and left after the first failure

    def write(self, data):
        data = bytes(data)[: _Disk.room]
        if not data:
            _Disk.room = _Disk.then
            raise OSError(errno.ENOSPC, "No space left on device")
        _Disk.room -= len(data)
        return super().write(data)


def _full_disk(monkeypatch, room: int, then: int = 0) -> None:
    """Every temporary file the project writes (``atomic_path``'s ``*.tmp``) goes to a disk
    with ``room`` bytes left, whatever opens it: Python, pathlib, NumPy, zipfile, PIL."""
    real = io.open
    _Disk.room, _Disk.then = room, then

    def opener(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, **kw):
        if not str(file).endswith(".tmp") or not set(mode) & set("wax+"):
            return real(file, mode, buffering, encoding, errors, newline, **kw)
        raw = _Disk(file, mode.replace("b", "").replace("t", ""))
        buffered = io.BufferedRandom(raw) if "+" in mode else io.BufferedWriter(raw)
        return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding, errors, newline)

    monkeypatch.setattr(io, "open", opener)
    monkeypatch.setattr(builtins, "open", opener)


def _figure(run, n):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow(np.random.default_rng(n).random((12 * n, 12 * n)))
    plots.save_figure(fig, run, "f1")
    plt.close(fig)


#: name: (a file of the run folder, the writer of its version ``n``, about ``n`` x 10 kB)
WRITERS = {
    "checkpoint": (f"{MODEL}/frozen_last.pt", lambda run, n: files.torch_save_atomic(
        {"w": torch.full((2500 * n,), n)}, run / f"{MODEL}/frozen_last.pt")),
    "scores": (f"{MODEL}/val_scores.npz", lambda run, n: files.save_npz(
        run / f"{MODEL}/val_scores.npz", probs=np.random.default_rng(n).random((16 * n, 80)))),
    "json": (f"{MODEL}/history.json", lambda run, n: files.save_json(
        [{"epoch": n, "loss": 0.5}] * (300 * n), run / f"{MODEL}/history.json")),
    "split": ("split.json", lambda run, n: split.load_or_make_split(
        [f"{i:012d}" for i in range(400 * n)], np.eye(80)[np.arange(400 * n) % 8],
        run / "split.json", seed=n, replace=True)),
    "submission": ("submission.json", lambda run, n: submission.write_submission(
        {f"{i:012d}": [n % 80] for i in range(400 * n)}, run / "submission.json")),
    "figure": ("figures/f1.png", _figure),
}  # fmt: skip


@pytest.mark.parametrize("share", [0, 0.01, 0.5, "all but one byte"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_full_disk_at_any_byte_of_any_file_is_one_sentence_and_keeps_the_old(
    tmp_path, monkeypatch, writer, share
):
    name, write = WRITERS[writer]
    write(tmp_path / "whole", 2)  # the new version, written whole: how big it is
    size = (tmp_path / "whole" / name).stat().st_size
    run = tmp_path / "run"
    write(run, 1)
    old = (run / name).read_bytes()
    _full_disk(monkeypatch, size - 1 if share == "all but one byte" else int(size * share))
    with pytest.raises(files.CannotWrite) as err:
        write(run, 2)
    monkeypatch.undo()
    folder = (run / name).parent
    assert _said(err).startswith(f"cannot write {folder}/")
    assert "(No space left on device): the disk is full" in str(err.value)
    assert f"`df -h {folder}`" in str(err.value)
    assert (run / name).read_bytes() == old  # the previous version, whole
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def test_a_disk_full_for_a_moment_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """Space freed while torch still writes (another run's files deleted): what was lost in
    between is not saved as a checkpoint."""
    old = files.torch_save_atomic({"w": torch.zeros(5000)}, tmp_path / "last.pt").read_bytes()
    _full_disk(monkeypatch, 1000, then=10**9)
    with pytest.raises(files.CannotWrite, match="No space left on device"):
        files.torch_save_atomic({"w": torch.ones(5000)}, tmp_path / "last.pt")
    monkeypatch.undo()
    assert (tmp_path / "last.pt").read_bytes() == old


def test_a_full_tmpfs_stops_each_writer_in_one_sentence_and_keeps_the_old_files(tmp_path):
    """A real 40 MB filesystem (root may mount one; elsewhere the test skips): checkpoints
    fill it as training would, then every writer meets the full disk part-way."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)]
    try:
        mounted = subprocess.run(mount, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = disk / "run"
        for _, write in WRITERS.values():
            write(run, 1)
        old = {name: (run / name).read_bytes() for name, _ in WRITERS.values()}
        kept, state = [], {"model": torch.nn.Linear(1000, 1000)}  # 4 MB a checkpoint
        with pytest.raises(files.CannotWrite) as err:
            for k in range(20):  # 160 MB: more than the disk
                folder = run / f"models/net{k}"
                checkpoints.PhaseCheckpoint(folder, "frozen", state).save(0, {}, 0.5)
                kept.append(folder)
        assert _said(err).startswith(f"cannot write {run}/models/net{len(kept)}/frozen_")
        assert "(No space left on device): the disk is full" in str(err.value)
        assert kept and not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
        for folder in kept:  # every earlier checkpoint whole
            assert checkpoints.PhaseCheckpoint(folder, "frozen", state).resume() == 1
        free = lambda: os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize  # noqa: E731
        (run / "models/net0/frozen_best.pt").unlink()
        (disk / "filler").write_bytes(b"x" * (free() - 16_000))
        assert free() < 20_000  # each writer below writes over 100 kB: it fails part-way
        for name, write in WRITERS.values():
            with pytest.raises(files.CannotWrite) as err:
                write(run, 20)
            assert "No space left on device" in _said(err)
            assert f"`df -h {(run / name).parent}`" in str(err.value)
            assert (run / name).read_bytes() == old[name]
    finally:
        subprocess.run(["umount", str(disk)], check=True, timeout=60)


# ---- damaged files, files of an earlier version, planted payloads --------------------------
class _Backbone(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)


def _feature_cache(run) -> tuple[Path, dict]:
    """A feature cache as the notebook writes it: 200 images x 256 float16 features."""
    images = torch.utils.data.TensorDataset(torch.rand(200, 1, 16, 16), torch.zeros(200))
    loader = torch.utils.data.DataLoader(images, batch_size=64)
    key = {"backbone": "b", "size": 16, "images": "split1"}
    path = run / MODEL / "features_train.pt"
    training.cached_features(path, _Backbone(), loader, "cpu", key=key, show_progress=False)
    return path, {**key, "rows": 200}


def _summed(data: bytes) -> bytes:
    """``data`` with a true last line: as if the file had been written so (by hand)."""
    return data + files._MARK + (files._SUM % (len(data), zlib.crc32(data))).encode()


def test_every_cut_of_a_feature_cache_is_named(tmp_path):
    path, key = _feature_cache(tmp_path)
    whole = path.read_bytes()
    cuts = sorted({*np.linspace(0, len(whole) - 1, 300).astype(int), len(whole) - 1})
    for cut in cuts:
        path.write_bytes(whole[:cut])  # the checksum line is cut, or gone
        with pytest.raises(files.CorruptFile, match="its size and checksum, is missing"):
            training.load_features(path, key)
        if cut >= len(whole) - files._TAIL:
            continue
        path.write_bytes(_summed(whole[:cut]))  # torch's errors (OSError too): a line made again
        with pytest.raises(files.CorruptFile) as err:
            training.load_features(path, key)
        assert _said(err).startswith(f"{path} is damaged (")
        assert f"move the folder {tmp_path / MODEL} out of the run folder" in str(err.value)
    path.write_bytes(whole)
    assert training.load_features(path, key).shape == (200, 256)


def test_changed_bytes_anywhere_in_a_torch_file_are_named(tmp_path):
    path, key = _feature_cache(tmp_path)
    whole = path.read_bytes()
    for at in sorted({*np.linspace(0, len(whole) - 1, 200).astype(int), len(whole) // 2}):
        changed = bytearray(whole)
        changed[at] ^= 0x10
        path.write_bytes(changed)
        with pytest.raises(files.CorruptFile, match=r"is damaged \(its (bytes do not|last line)"):
            training.load_features(path, key)


def test_cut_or_changed_scores_are_named_or_read_unchanged(tmp_path):
    """``.npz`` files need no line of their own: zip's CRC-32, which NumPy's reader checks,
    covers every array."""
    probs = np.random.default_rng(0).random((50, 80))
    path = files.save_npz(tmp_path / "val_scores.npz", probs=probs, stems=np.array(["1"] * 50))
    whole = path.read_bytes()
    for at in np.linspace(0, len(whole) - 1, 150).astype(int):
        changed = bytearray(whole)
        changed[at] ^= 0x10
        for damaged in (whole[:at], changed):
            path.write_bytes(damaged)
            try:
                assert np.array_equal(files.load_npz(path)["probs"], probs)
            except files.CorruptFile as err:
                assert str(err).startswith(f"{path} is damaged")


class _Payload:
    """Writes a marker file when unpickled: what a planted file could run instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("form", ["torch.save", "torch.save + a true last line", "pickle"])
def test_a_payload_planted_in_a_run_folder_does_not_run_and_is_named(tmp_path, form):
    marker = tmp_path / "ran"
    folder = tmp_path / "run" / MODEL
    folder.mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save({"epoch": 0, "state": {}, "x": _Payload(marker)}, buffer)
    planted = {"torch.save": buffer.getvalue(),
               "torch.save + a true last line": _summed(buffer.getvalue()),
               "pickle": _summed(pickle.dumps(_Payload(marker), protocol=2))}[form]  # fmt: skip
    net = torch.nn.Linear(4, 2)
    paths = {"train": folder / "features_train.pt", "val": folder / "features_val.pt"}
    loaders = {p: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.rand(8, 4), torch.zeros(8))) for p in paths}  # fmt: skip
    for path, read in (
        (folder / "finetune_last.pt",
         lambda: checkpoints.PhaseCheckpoint(folder, "finetune", {"model": net}).resume()),
        (paths["train"], lambda: training.load_features(paths["train"])),
        (paths["train"], lambda: training.cached_feature_parts(paths, _Backbone(), loaders, "cpu",
                                                               show_progress=False)),
    ):  # fmt: skip
        path.write_bytes(planted)
        with pytest.raises(files.CorruptFile) as err:
            read()
        assert _said(err).startswith(f"{path} ")
        assert f"move the folder {folder} out of the run folder" in str(err.value)
        assert not marker.exists() and not paths["val"].exists()  # nothing ran, nothing computed
    if form != "pickle":
        said = {"torch.save": "written by an earlier version",
                "torch.save + a true last line": r"\(UnpicklingError: Weights only"}  # fmt: skip
        with pytest.raises(files.CorruptFile, match=said[form]):
            files.load_torch(path)
    # the payload is real: unpickled, it runs
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert marker.exists()


def test_a_checkpoint_of_the_earlier_format_is_refused_in_one_sentence(tmp_path):
    folder = tmp_path / "run" / MODEL
    folder.mkdir(parents=True)
    net = torch.nn.Linear(4, 2)
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python":
           random.getstate(), "cuda": None}  # fmt: skip
    torch.save({"state": {"model": net.state_dict()}, "history": [], "best": 0.5,
                "best_epoch": 1, "epoch": 0, "rng": rng}, folder / "frozen_last.pt")  # fmt: skip
    with pytest.raises(files.CorruptFile) as err:
        checkpoints.PhaseCheckpoint(folder, "frozen", {"model": net}).resume()
    assert _said(err) == (
        f"{folder / 'frozen_last.pt'} was written by an earlier version of this project, in a "
        "form whose reading could run code: it is not read. To make it again, move the folder "
        f"{folder} out of the run folder, then run the challenge notebook again: "
        "efficientnet_lite0 is trained again."
    )


def test_a_resumed_run_draws_what_the_uninterrupted_run_draws(tmp_path):
    """Every generator's state goes into the checkpoint as tensors and lists, and comes back
    exactly: NumPy's and Python's cached Gaussian included."""
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal(), random.gauss(0, 1)  # each now holds a second value, cached
    ckpt = checkpoints.PhaseCheckpoint(tmp_path, "frozen", {"model": torch.nn.Linear(3, 2)})
    row = checkpoints.epoch_row("frozen", 0, 0, 1.0, {"loss": np.float64(0.5)}, {})
    ckpt.save(0, row, np.float64(0.7))  # NumPy's numbers, saved as Python's
    draws = lambda: [torch.rand(3).tolist(), np.random.normal(), np.random.rand(3).tolist(),  # noqa: E731
                     random.gauss(0, 1), random.random()]  # fmt: skip
    expected = draws()
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    again = checkpoints.PhaseCheckpoint(tmp_path, "frozen", {"model": torch.nn.Linear(3, 2)})
    assert again.resume(log=lambda *a: None) == 1 and draws() == expected
    assert again.history == [row] and again.best_epoch == 1


@pytest.mark.parametrize("value", [np.float64(0.5), np.zeros(3), {1, 2}, Path("x")])
def test_only_what_weights_only_reads_back_is_saved(tmp_path, value):
    with pytest.raises(TypeError, match=r"plain containers only: the object\['history'\]\[0\] is"):
        files.torch_save_atomic({"history": [value]}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []
