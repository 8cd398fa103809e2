"""The Moodle zip: written only for a clean run, never with checkpoints or logs."""

import json
import zipfile

import pytest

from cocochallenge import files, handin

pytestmark = pytest.mark.quick


def _notebook(path, run_dir, counts=(1, 2, 3), error=False):
    cells = []
    for n in counts:
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
                "source": [],
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
    ],
)
def test_problems_are_said_and_nothing_is_written(run, damage, expected):
    damage(run)
    lines = []
    assert handin.pack(run, log=lines.append) is None
    assert expected in "\n".join(lines) and not (run / "handin.zip").exists()


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
    nb["cells"].insert(2, {"cell_type": "markdown", "metadata": {},
                           "source": ["*In this run:* course F1 0.491."]})  # fmt: skip
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
