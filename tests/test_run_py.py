"""run.py's executed notebooks: saved whole after every cell, kept from the last run that went
to its end, and a run that stops at Ctrl-C within seconds, with its kernel."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
from papermill.engines import NotebookExecutionManager
from papermill.exceptions import PapermillExecutionError

import run
from cocochallenge import config, files, handin

ROOT = Path(__file__).resolve().parents[1]


def _notebook(n_cells=3, text="x"):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A notebook")]
    nb.cells += [nbformat.v4.new_code_cell(f"print({text!r})") for _ in range(n_cells)]
    nb.metadata["kernelspec"] = run.KERNELSPEC
    nb.metadata["papermill"] = {}
    for cell in nb.cells:
        cell.metadata["papermill"] = {}
    return nb


def _saves(path, texts):
    """papermill's own saves of notebooks to ``path``, through the path run.py hands it."""
    for text in texts:
        NotebookExecutionManager(
            _notebook(text=text), run.atomic_output(path), progress_bar=False
        ).save()


@pytest.mark.quick
def test_a_full_disk_part_way_through_a_save_keeps_the_last_copy(tmp_path, monkeypatch):
    """The disk fills up in the middle of the third save, after two good ones: the second copy
    stays whole and the error is one sentence naming the folder and `df -h`."""
    path = tmp_path / "run" / "challenge.unfinished.ipynb"
    _saves(path, ["first", "second"])
    before = path.read_bytes()
    real = Path.write_text

    def full(self, text, *a, **k):
        real(self, text[: len(text) // 2], *a, **k)  # half of it reaches the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(files.CannotWrite) as err:
        _saves(path, ["third" * 1000])
    monkeypatch.undo()
    assert path.read_bytes() == before and "second" in nbformat.read(path, 4).cells[1].source
    assert f"cannot write {path} (No space left on device)" in str(err.value)
    assert f"`df -h {path.parent}`" in str(err.value)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file


def _mount_tmpfs(disk: Path, size: str) -> None:
    """A small real filesystem at ``disk``, where the test may mount one (as root)."""
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")


@pytest.mark.quick
def test_a_full_tmpfs_keeps_the_last_copy(tmp_path):
    """The same on a real small filesystem."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "1m")
    try:
        path = disk / "challenge.unfinished.ipynb"
        _saves(path, ["a small notebook"])
        before = path.read_bytes()
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"0" * (free - 16384))  # 16 kB left: 4 pages
        with pytest.raises(files.CannotWrite, match="No space left on device"):
            _saves(path, ["a notebook that no longer fits " * 2000])
        assert path.read_bytes() == before
        assert sorted(p.name for p in disk.iterdir()) == ["challenge.unfinished.ipynb", "filler"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_tmpfs_while_papermill_saves_after_a_cell_keeps_the_copy_before_it(tmp_path):
    """A real run on a 2 MB filesystem: the save after a cell that printed 3 MB fails part-way.
    run.execute says so in one sentence, and the copy saved after the cell before is whole."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "2m")
    try:
        nb = _notebook(n_cells=1, text="the first cell")
        nb.cells.append(nbformat.v4.new_code_cell("print('y' * 3_000_000)"))
        nbformat.write(nb, tmp_path / "big.ipynb")
        out = disk / "run" / "challenge.ipynb"
        with pytest.raises(files.CannotWrite) as err:
            run.execute(tmp_path / "big.ipynb", out, {}, quiet=True)
        assert "(No space left on device): the disk is full" in str(err.value)
        assert f"`df -h {out.parent}`" in str(err.value)
        copy = handin.unfinished(out)
        cells = nbformat.read(copy, 4).cells  # whole: it reads
        assert cells[1].outputs[0].text == "the first cell\n" and not cells[2].outputs
        assert sorted(p.name for p in out.parent.iterdir()) == [copy.name]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _fake_papermill(fail_with=None):
    """papermill's execute_notebook without a kernel: it saves the copy twice, through the
    path run.py hands it, then fails with ``fail_with`` (an error's name) or completes."""

    def execute_notebook(input_path, output_path, parameters, **kwargs):
        nb = _notebook(text=f"ran with {parameters}")
        nb.cells[1].metadata["papermill"]["start_time"] = "2026-01-01T00:00:00"
        nb.cells[1].execution_count = 1
        NotebookExecutionManager(nb, output_path, progress_bar=False).save()
        if fail_with:
            raise PapermillExecutionError(1, 1, "x", fail_with, "nothing was trained", [])
        NotebookExecutionManager(nb, output_path, progress_bar=False).save()
        return nb

    return execute_notebook


@pytest.mark.quick
def test_only_a_run_that_went_to_its_end_replaces_the_executed_notebook(
    tmp_path, monkeypatch, capsys
):
    """A stale setting stops the rerun before training: the good run's challenge.ipynb stays
    as it was, the stopped run's copy is beside it and named, and the hand-in packs the good
    one (and says that a later run stopped). The next complete run replaces both."""
    import papermill

    run_dir = tmp_path / "run"
    out = run_dir / "challenge.ipynb"
    monkeypatch.setattr(papermill, "execute_notebook", _fake_papermill())
    run.execute(ROOT / "challenge.ipynb", out, {"SEED": 1})
    good = out.read_bytes()
    assert "ran with {'SEED': 1}" in good.decode() and not handin.unfinished(out).exists()
    assert json.loads(good)["metadata"]["papermill"]["output_path"] == os.path.relpath(out, ROOT)

    monkeypatch.setattr(papermill, "execute_notebook", _fake_papermill("StaleRunError"))
    monkeypatch.setattr(run, "uses_cpu_recipe", lambda args: False)
    monkeypatch.setattr(config, "keep_freed_memory", lambda: "")  # main's changes, undone after
    for key in [k for k in os.environ if k.startswith("COCO_")] + list(run.kernel_environment()):
        monkeypatch.setenv(key, os.environ.get(key, ""))
    monkeypatch.chdir(ROOT)
    code = run.main(["--run-dir", str(run_dir), "--no-analysis", "-p", "SEED", "2"])
    err = capsys.readouterr().err
    assert code == 1 and out.read_bytes() == good
    copy = handin.unfinished(out)
    assert "ran with {" in copy.read_text() and "'SEED': 2" in copy.read_text()
    assert f"StaleRunError: nothing was trained\n(the full traceback is in {copy}; {out} is " \
           "still the last complete run's)" in err  # fmt: skip
    assert handin.collect(run_dir, ROOT)["challenge.ipynb"] == out
    lines = []
    handin.pack(run_dir, log=lines.append)
    assert f"note: {copy} is a later run that stopped before its end; packed: {out}" in lines

    monkeypatch.setattr(papermill, "execute_notebook", _fake_papermill())
    run.execute(ROOT / "challenge.ipynb", out, {"SEED": 3})
    assert "'SEED': 3" in out.read_text() and not copy.exists()


@pytest.mark.quick
@pytest.mark.parametrize("option", ["--run-dir", "--data-root"])
def test_a_folder_that_is_a_loop_of_links_is_said_in_one_sentence(tmp_path, capsys, option):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(SystemExit) as stop:
        run.main([option, str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert f"{option} {tmp_path / 'a'} is a loop of symbolic links" in err
    assert f"`ls -l {tmp_path / 'a'}`" in err


#: Runs a notebook through run.execute; a stop at Ctrl-C is said as run.py says where.
DRIVER = r"""
import sys
from pathlib import Path
import run
from cocochallenge.handin import unfinished
run.INTERRUPT_WAIT = 3
out = Path(sys.argv[2])
try:
    run.execute(Path(sys.argv[1]), out, {})
except KeyboardInterrupt:
    print("stopped at", run.stopped_at(unfinished(out)), flush=True)
    sys.exit(130)
"""


def _kernel_pids(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (the kernel a run.py process started)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def _ended(pid: int) -> bool:
    info = files._process(pid)
    return info is None or info[0] == "Z"


def _watch(proc, lines, ready):
    for line in proc.stdout:
        lines.append(line)
        if "ready" in line:
            ready.set()


@pytest.mark.quick
def test_ctrl_c_interrupts_the_kernel_or_stops_one_that_goes_on(tmp_path):
    """Ctrl-C interrupts the kernel's cell: the copy ends with KeyboardInterrupt in that cell and
    the kernel ends within seconds. A kernel that ignores the interrupt is stopped after the
    wait (run.INTERRUPT_WAIT, 3 s here). Both run at once, each in its own process."""
    work = "import time\nprint('ready', flush=True)\ntime.sleep(120)"
    stubborn = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n" + work
    procs = {}
    for name, source in (("plain", work), ("stubborn", stubborn)):
        nb = _notebook(n_cells=1)
        nb.cells += [nbformat.v4.new_markdown_cell("## 2. The long cell"),
                     nbformat.v4.new_code_cell(source)]  # fmt: skip
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
        out = tmp_path / name / "out.ipynb"
        args = [sys.executable, "-c", DRIVER, str(tmp_path / f"{name}.ipynb"), str(out)]
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        lines, ready = [], threading.Event()
        threading.Thread(target=_watch, args=(proc, lines, ready), daemon=True).start()
        procs[name] = (proc, lines, ready, out)
    try:
        for name, (proc, lines, ready, out) in procs.items():
            assert ready.wait(120), "".join(lines)
            kernels = _kernel_pids(proc.pid)
            assert kernels
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(15) == 130, "".join(lines)
            assert all(_ended(pid) for pid in kernels), name
            print(f"{name}: ended {time.monotonic() - t0:.1f} s after Ctrl-C")
            assert 'stopped at cell 2 (section "2. The long cell")' in "".join(lines)
            copy = handin.unfinished(out)
            assert not out.exists() and copy.exists()
            if name == "plain":
                errors = [o for o in nbformat.read(copy, 4).cells[-1].outputs
                          if o.output_type == "error"]  # fmt: skip
                assert errors and errors[0].ename == "KeyboardInterrupt"
    finally:
        for proc, *_ in procs.values():
            proc.kill()
            proc.wait()


def _run_py(args, lines, until=None):
    """run.py in its own process, its output collected in ``lines``; returns the process and
    an event set when a line holds ``until``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCO_")}
    proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    seen = threading.Event()

    def watch():
        for line in proc.stdout:
            lines.append(line)
            if until and until in line:
                seen.set()

    threading.Thread(target=watch, daemon=True).start()
    return proc, seen


def test_ctrl_c_stops_run_py_in_either_phase_and_the_same_command_continues(demo_root, tmp_path):
    """SIGINT to run.py in the feature pass, then in fine-tuning: each time the run and its
    kernel end within 15 s, say where they stopped and that a rerun continues, without a
    traceback; the third run resumes fine-tuning after its first epoch and completes. A fourth,
    stopped by a data error before training, keeps the third's executed notebook."""
    run_dir = tmp_path / "run"
    options = {"img_size": 64, "workers": 0, "progress": False, "seeds": 1}
    args = ["--data-root", str(demo_root), "--run-dir", str(run_dir), "--no-analysis",
            "--backbones", "efficientnet_lite0", "-p", "EPOCHS_FROZEN", "2",
            "-p", "EPOCHS_FINETUNE", "2", "-p", "OPTIONS", repr(options)]  # fmt: skip
    out, copy = run_dir / "challenge.ipynb", run_dir / "challenge.unfinished.ipynb"
    for when in ("efficientnet_lite0\n", "finetune  1/2"):  # its name: before its features
        lines = []
        proc, seen = _run_py(args, lines, until=when)
        try:
            assert seen.wait(300), "".join(lines)
            kernels = _kernel_pids(proc.pid)
            proc.send_signal(signal.SIGINT)
            t0 = time.monotonic()
            assert proc.wait(15) == 130, "".join(lines)
            while not all(_ended(pid) for pid in kernels) and time.monotonic() < t0 + 15:
                time.sleep(0.2)
            assert kernels and all(_ended(pid) for pid in kernels), when
        finally:
            proc.kill()
            proc.wait()
        text = "".join(lines)
        assert "Traceback" not in text and not out.exists(), text[-3000:]
        said = re.search(r'stopped \(Ctrl-C\) in challenge.ipynb, cell \d+ \(section "[^"]+"\); '
                         r"its executed copy up to there: (.+)\. Run the same command again: it "
                         r"continues after the last completed epoch", text)  # fmt: skip
        assert said and said[1] == str(copy), text[-3000:]
    lines = []
    proc, _ = _run_py(args, lines)
    assert proc.wait(600) == 0, "".join(lines)[-3000:]
    text = "".join(lines)
    assert "[finetune] resuming after epoch 1" in text and "finetune  2/2" in text
    assert "finetune  1/2" not in text and out.exists() and not copy.exists()
    good = out.read_bytes()
    args[1] = str(tmp_path / "nowhere")
    lines = []
    proc, _ = _run_py(args, lines)
    assert proc.wait(300) == 1 and out.read_bytes() == good
    assert f"(the full traceback is in {copy}; {out} is still the last complete run's)" in "".join(
        lines
    )
    assert any(o.get("ename") == "DataError" for c in nbformat.read(copy, 4).cells
               for o in c.get("outputs", []))  # fmt: skip


def test_ctrl_c_stops_the_cpu_recipe_in_one_line(real_dev, tmp_path):
    """The CPU recipe runs in run.py's own process: Ctrl-C ends it with one line, no traceback,
    and leaves the run folder free for the next run."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU, run.py runs the notebook, not the CPU recipe")
    lines = []
    args = ["--data-root", str(real_dev / "ms-coco"), "--run-dir", str(tmp_path / "run")]
    proc, seen = _run_py(args, lines, until="the offline CPU recipe")
    try:
        assert seen.wait(120), "".join(lines)
        time.sleep(1)  # inside cpu_recipe.run
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 130, "".join(lines)
    finally:
        proc.kill()
        proc.wait()
    text = "".join(lines)
    assert "Traceback" not in text and text.strip().splitlines()[-1] == (
        "stopped (Ctrl-C) in the CPU recipe. Run the same command again: the networks it fitted "
        "are reused."
    )
    assert not (tmp_path / "run" / files.LOCK_NAME).exists()
