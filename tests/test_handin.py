"""The Moodle zip: written only for a clean run, never with checkpoints or logs."""

import json
import os
import time
import zipfile

import pytest

from cocochallenge import files, handin

pytestmark = pytest.mark.quick


def _notebook(path, run_dir, counts=(1, 2, 3), error=False):
    """A notebook of ``len(counts)`` code cells, ``step(1)``, ``step(2)``, ..., with those
    execution counts, then the hand-in cell."""
    cells = []
    for i, n in enumerate(counts, 1):
        outs = [{"output_type": "stream", "name": "stdout", "text": [f"run folder: {run_dir}\n"]}]
        if error and n == counts[-1]:
            outs.append(
                {"output_type": "error", "ename": "ValueError", "evalue": "boom", "traceback": []}
            )
        cells.append(
            {
                "cell_type": "code",
                "execution_count": n,
                "metadata": {},
                "outputs": outs,
                "source": [f"step({i})"],
            }
        )
    cells.append(
        {
            "cell_type": "code",
            "execution_count": None,
            "metadata": {"tags": ["handin"]},
            "outputs": [],
            "source": [],
        }
    )
    path.write_text(
        json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5})
    )


@pytest.fixture()
def run(tmp_path):
    data_root = tmp_path / "ms-coco"
    (data_root / "images/test-resized").mkdir(parents=True)
    for stem in ("000000000001", "000000000002"):
        (data_root / "images/test-resized" / f"{stem}.jpg").write_bytes(b"x")
    run_dir = tmp_path / "runs" / "demo"
    for name in ("challenge.ipynb", "analysis.ipynb"):
        run_dir.mkdir(parents=True, exist_ok=True)
        _notebook(run_dir / name, run_dir)
    files.save_json({"000000000001": [0], "000000000002": [1, 5]}, run_dir / "submission.json")
    files.save_json({"data_root": str(data_root)}, run_dir / "summary.json")
    for name in ("config.json", "environment.json"):
        files.save_json({}, run_dir / name)
    (run_dir / "results.csv").write_text("model,f1\nx,0.5\n")
    (run_dir / "figures").mkdir()
    (run_dir / "figures/01.png").write_bytes(b"png")
    (run_dir / "models/x").mkdir(parents=True)
    (run_dir / "models/x/finetune_best.pt").write_bytes(b"0" * 1000)
    (run_dir / "tensorboard/x").mkdir(parents=True)
    (run_dir / "tensorboard/x/events.out").write_bytes(b"0")
    return run_dir


def test_clean_run_is_packed_without_checkpoints_or_logs(run):
    lines = []
    out = handin.pack(run, log=lines.append)
    assert out == run / "handin.zip"
    names = zipfile.ZipFile(out).namelist()
    for must in (
        "challenge.ipynb",
        "analysis.ipynb",
        "helpers.py",
        "cocochallenge/handin.py",
        "requirements.txt",
        "README.md",
        "run/submission.json",
        "run/results.csv",
        "run/figures/01.png",
        "run/config.json",
        "run/environment.json",
        "tools/evidence/evidence.csv",
        "tools/evidence/README.md",
    ):  # the analysis notebook reads the table and cites its README
        assert must in names, must
    assert not [n for n in names if n.endswith(".pt") or "tensorboard" in n or "features" in n]
    assert any("handin.zip" in line and "MB" in line for line in lines)


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda r: _notebook(r / "challenge.ipynb", r, counts=(1, 3, 2)), "not run top to bottom"),
        (lambda r: _notebook(r / "analysis.ipynb", r, error=True), "ValueError"),
        (
            lambda r: _notebook(r / "challenge.ipynb", r.parent / "other"),
            "never name the run folder",
        ),
        (
            lambda r: files.save_json({"000000000001": [0]}, r / "submission.json"),
            "submission.json is not valid",
        ),
        (lambda r: (r / "config.json").unlink(), "run/config.json is missing"),
        (
            lambda r: (r / "submission.json").write_text('{"000000000001": [' + "1" * 5000 + "]}"),
            "holds a number too long to read",
        ),
    ],
)
def test_problems_are_said_and_nothing_is_written(run, damage, expected):
    damage(run)
    lines = []
    assert handin.pack(run, log=lines.append) is None
    assert expected in "\n".join(lines) and not (run / "handin.zip").exists()


@pytest.mark.parametrize(
    "raw",
    [b"{}", b"[]", b'{"cells": [{"cell_type": "code", "source": "\xe9"}]}', b'{"cells": [{"cel'],
)
def test_a_damaged_run_notebook_is_one_sentence_and_nothing_is_written(run, raw):
    """Emptied, replaced by a list, saved in another encoding, or cut off by a full disk."""
    (run / "challenge.ipynb").write_bytes(raw)
    lines = []
    assert handin.pack(run, log=lines.append) is None and not (run / "handin.zip").exists()
    assert lines[-1] == (
        f"hand-in NOT written:\n  {run / 'challenge.ipynb'} is not a readable notebook (cut off "
        "or overwritten): run it again (python run.py, or Run All in Jupyter and save)"
    )


def test_a_link_out_of_the_run_folder_is_not_packed(run, tmp_path):
    """A figure that links to a file elsewhere is left out, with a line; a link inside is kept."""
    (tmp_path / "secret.png").write_bytes(b"not the team's")
    (run / "figures/02.png").symlink_to(tmp_path / "secret.png")
    (run / "figures/03.png").symlink_to(run / "figures/01.png")
    lines = []
    names = zipfile.ZipFile(handin.pack(run, log=lines.append)).namelist()
    assert "run/figures/03.png" in names and "run/figures/02.png" not in names
    assert (
        f"not packed: {run / 'figures/02.png'} is a link to {(tmp_path / 'secret.png').resolve()}, "
        "outside the run folder" in lines
    )


def test_size_limit_is_a_parameter(run):
    (run / "figures/02.png").write_bytes(b"0" * 300_000)
    lines = []
    assert handin.pack(run, max_mb=0.1, log=lines.append) is None and "limit" in lines[-1]
    assert handin.pack(run, max_mb=5, log=lines.append) is not None


def test_a_blank_team_block_and_prose_of_another_run_are_warned_about(run):
    """The zip is still written (a warning, not a refusal), but the team hears that the team
    block is blank and that the analysis quotes a number its outputs do not show."""
    path = run / "challenge.ipynb"
    nb = json.loads(path.read_text())
    team = {"cell_type": "markdown", "metadata": {"tags": ["team"]},
            "source": ["## Team\n- **Names:** (your names)\n"]}  # fmt: skip
    nb["cells"].insert(0, team)
    path.write_text(json.dumps(nb))
    analysis = run / "analysis.ipynb"
    nb = json.loads(analysis.read_text())
    nb["cells"][:0] = [{"cell_type": "markdown", "metadata": {}, "source": ["## 2. Study"]}]
    nb["cells"].insert(2, {"cell_type": "markdown", "metadata": {"tags": ["team-reading"]},
                           "source": ["We read a course F1 of 0.491."]})  # fmt: skip
    analysis.write_text(json.dumps(nb))
    lines = []
    assert handin.pack(run, log=lines.append) is not None
    warned = [line for line in lines if line.startswith("WARNING")]
    assert len(warned) == 2, lines
    assert "challenge.ipynb: the team block is blank" in warned[0]
    assert "analysis.ipynb" in warned[1] and "0.491" in warned[1]
    team["source"] = ["## Team\n- **Names:** Ada and Alan\n"]
    nb = json.loads(path.read_text())
    nb["cells"][0] = team
    path.write_text(json.dumps(nb))
    lines = []
    handin.pack(run, log=lines.append)
    assert sum(line.startswith("WARNING") for line in lines) == 1  # only the prose now


HANDIN = "handin.pack(RUN, notebook='analysis.ipynb')"


def _team(run, tmp_path):
    """The project folder the team runs in JupyterLab: both notebooks run and saved there after
    the run's results, and older executed copies of run.py in the run folder."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("challenge.ipynb", "analysis.ipynb"):
        _notebook(run / name, run, counts=(1, 2, 3, 4))  # run.py's, from an earlier run
        os.utime(run / name, (time.time() - 7200, time.time() - 7200))
        _notebook(project / name, run)
    return project


RESTART = "Kernel > Restart Kernel and Run All Cells, then File > Save, then run this cell again"
SAVE = "(a kernel cannot save its own notebook): File > Save, then run this cell again"
RAN = ["", "step(1)", "step(2)", "step(3)", HANDIN]  # the kernel's cells, the running one last


@pytest.mark.parametrize(
    "history,counts,age,expected",
    [
        (RAN, (1, 2, 3), 0, None),
        (RAN + [HANDIN], (1, 2, 3), 0, None),  # the hand-in cell again, after a refusal
        (RAN, (1, None, None), 0, SAVE),  # saved while the cells ran (JupyterLab's autosave)
        (RAN, (1, 2, 3), 1e9, SAVE),  # saved before this kernel started: another run's
        (RAN, (5, 6, 7), 1e9, SAVE),
        (RAN, (5, 6, 7), 0, SAVE + " (if this repeats: " + RESTART.split(", then run")[0]),
        (["", "step(1)", "step(3)", "step(2)", HANDIN], (1, 3, 2), 0, RESTART),
        (["", "step(1)", "step(2)", "step(2)", "step(3)", HANDIN], (1, 2, 3), 0, RESTART),
        (["", "step(1)", "step(2)", "step(3)", "step(9)", HANDIN], (1, 2, 3), 0, RESTART),
    ],
)
def test_packed_from_a_cell_the_saved_notebook_is_this_kernels_run(
    run, tmp_path, history, counts, age, expected
):
    """A kernel cannot save its notebook: the hand-in cell packs the saved file only when it
    holds what this kernel ran above it (in order, once each, counts 1..n, saved since the
    kernel started), else it names the one step: File > Save, or a run top to bottom first."""
    project = _team(run, tmp_path)
    analysis = project / "analysis.ipynb"
    _notebook(analysis, run, counts=counts)
    os.utime(analysis, (time.time() - age, time.time() - age))  # saved before the kernel began
    for path in (project / "challenge.ipynb", analysis):  # the challenge notebook: saved last
        os.utime(path, (os.stat(path).st_atime, os.stat(path).st_mtime + 1))
    lines = []
    out = handin.pack(run, project=project, log=lines.append, notebook=analysis, history=history)
    if expected is None:
        assert out is not None, lines
        zipped = zipfile.ZipFile(out)
        assert json.loads(zipped.read("analysis.ipynb")) == json.loads(analysis.read_text())
        assert any(str(analysis) in line and "analysis.ipynb" in line for line in lines)
    else:
        assert out is None and not (run / "handin.zip").exists()
        refusal = "\n".join(lines)
        assert expected in refusal, refusal
        assert (expected == RESTART) == ("Restart" in refusal.split("(if this repeats")[0])
        assert "not run top to bottom" not in refusal  # the kernel's one step, not two


def test_packed_from_a_cell_the_challenge_notebook_is_saved_after_the_results(run, tmp_path):
    """Run all in challenge.ipynb, not saved: its file shows an earlier run. Where run.py ran it
    later, its executed copy in the run folder is the one that made the results."""
    project = _team(run, tmp_path)
    old = time.time() - 3600
    os.utime(project / "challenge.ipynb", (old, old))
    history = ["", "step(1)", "step(2)", "step(3)", HANDIN]
    lines = []
    assert handin.pack(run, project=project, log=lines.append,
                       notebook=project / "analysis.ipynb", history=history) is None  # fmt: skip
    said = [line for line in lines if "saved before the run's results" in line]
    assert said and "File > Save, then run this cell again" in said[0], lines
    (run / "challenge.ipynb").touch()  # run.py's executed copy, written after the results
    lines = []
    out = handin.pack(run, project=project, log=lines.append,
                      notebook=project / "analysis.ipynb", history=history)  # fmt: skip
    assert out is not None, lines
    packed = json.loads(zipfile.ZipFile(out).read("challenge.ipynb"))
    assert packed == json.loads((run / "challenge.ipynb").read_text())


def test_the_hand_in_cell_reads_its_kernels_own_history(run, tmp_path, monkeypatch):
    """In an IPython shell, as in a notebook's kernel: the cells it ran are the history."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    project = _team(run, tmp_path)
    os.utime(project / "challenge.ipynb", (time.time() + 5, time.time() + 5))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    config = Config()
    config.HistoryManager.hist_file = ":memory:"  # nothing written at this process's exit
    shell = InteractiveShell.instance(config=config)
    try:
        shell.user_ns.update(step=lambda i: i, handin=handin, RUN=run, lines=[])
        monkeypatch.chdir(project)
        for i in (1, 2, 3):
            shell.run_cell(f"step({i})", store_history=True)
        shell.run_cell("out = handin.pack(RUN, notebook='analysis.ipynb', log=lines.append)",
                       store_history=True)  # fmt: skip
        assert shell.user_ns["out"] is not None, shell.user_ns["lines"]
        shell.run_cell("step(3)", store_history=True)  # one cell more: not the saved run
        shell.run_cell("out = handin.pack(RUN, notebook='analysis.ipynb', log=lines.append)",
                       store_history=True)  # fmt: skip
        assert shell.user_ns["out"] is None and "Restart Kernel" in shell.user_ns["lines"][-1]
    finally:
        InteractiveShell.clear_instance()
