"""The committed notebooks as this repository ships them: their parameters, outputs, prose and
layout, compared with what the project promises (not quick: a team's own run saved into the
notebooks changes all of these, and the quick tests must pass on it, which the last test here
checks on such a run)."""

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("challenge.ipynb", "analysis.ipynb")


def _cells(name: str, kind: str = "code") -> list[str]:
    nb = json.loads((ROOT / name).read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind]


def test_committed_notebooks_cells_are_short_and_the_loop_is_in_sight():
    code = _cells("challenge.ipynb")
    longest = max(len(c.splitlines()) for c in code if not c.startswith("# data and run folder"))
    assert longest <= 24, longest
    text = "\n".join(code)
    for piece in (
        "h.train_loop(",
        "h.validation_loop(",
        "h.update_graphs(",
        "ckpt.save(",
        "ckpt.resume(",
        "freeze_backbone(",
        "param_groups(",
        "warmup_cosine(",
        "for name in BACKBONES",
        "h.COCOTrainImageDataset(",
        "h.COCOTestImageDataset(",
    ):
        assert piece in text, piece


def test_committed_notebooks_parameters_cell_holds_at_most_15_settings():
    cell = next(c for c in _cells("challenge.ipynb") if c.startswith("# data and run folder"))
    names = [n.targets[0].id for n in ast.parse(cell).body if isinstance(n, ast.Assign)]
    assert len(names) <= 15 and len(set(names)) == len(names), names
    assert all(line.startswith("#") or " = " in line for line in cell.splitlines() if line)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_lines_fit_a_jupyterlab_cell(name):
    long = [line for c in _cells(name) + _cells(name, "markdown") for line in c.splitlines()
            if len(line) > 100]  # fmt: skip
    assert not long, long[:3]


def test_committed_notebooks_store_the_kernel_name_jupyterlab_writes():
    """Opened in JupyterLab, a notebook stored as "Python 3" is rewritten (and marked modified)."""
    import run

    for name in NOTEBOOKS:
        spec = json.loads((ROOT / name).read_text())["metadata"]["kernelspec"]
        assert (
            spec
            == run.KERNELSPEC
            == {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
        ), name


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_show_no_folder_of_the_machine_that_ran_them(name):
    """Outputs and metadata name the run's folders relative to the repository: a handed-in
    notebook shows neither the author's home nor a temporary folder."""
    nb = json.loads((ROOT / name).read_text())
    saved = json.dumps([c.get("outputs", []) for c in nb["cells"]]) + json.dumps(nb["metadata"])
    for folder in (str(ROOT), str(ROOT.parent), "/tmp/"):
        assert folder not in saved, folder


@pytest.mark.parametrize("pair", [("challenge.ipynb", "1_challenge.ipynb"),
                                  ("analysis.ipynb", "2_analysis.ipynb")])  # fmt: skip
def test_committed_notebooks_are_the_code_their_nbval_copies_run(pair):
    """nbval runs tests/nbval/ (references of the demo configuration): their cells must be the
    notebooks' cells, or the suite would check code nobody runs (tools/nbval_references.py)."""
    source, copy = pair
    mine = [
        (c["cell_type"], "".join(c["source"]))
        for c in json.loads((ROOT / source).read_text())["cells"]
    ]
    nb = json.loads((ROOT / "tests" / "nbval" / copy).read_text())
    theirs = [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]
    assert mine == theirs, f"tests/nbval/{copy} is stale: run python tools/nbval_references.py"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_prose_quotes_only_numbers_their_outputs_show(name):
    """The team's readings in the committed notebooks (cells tagged team-reading: at most five
    in both, the analysis' conclusions among them) quote only numbers their outputs show
    (report.unbacked_numbers, which the hand-in also runs); no other markdown cell reads a run."""
    from cocochallenge import report

    nb = json.loads((ROOT / name).read_text())
    reading = [c for c in nb["cells"] if report.is_reading(c)]
    assert len(reading) <= (0 if name == "challenge.ipynb" else 5)
    assert name == "challenge.ipynb" or any("Conclusions" in "".join(c["source"]) for c in reading)
    assert report.unbacked_numbers(nb) == []
    assert not [c for c in nb["cells"] if "In this run" in "".join(c["source"])]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_hold_no_injected_parameters_and_one_run(name):
    """papermill's injected cell would sit under the parameters cell and override a student's
    edit of it; run.py --update-notebooks removes it when it copies a run's notebooks."""
    cells = json.loads((ROOT / name).read_text())["cells"]
    tags = [t for c in cells for t in c.get("metadata", {}).get("tags", [])]
    assert "injected-parameters" not in tags and tags.count("parameters") == 1
    counts = [c["execution_count"] for c in cells if c["cell_type"] == "code"]
    ran = [n for n in counts if n is not None]
    assert ran == list(range(1, len(ran) + 1)), counts  # one run, top to bottom


def test_committed_notebooks_are_ruff_clean():
    """The style pyproject.toml declares, on the notebooks' code cells."""
    for args in (["check"], ["format", "--check"]):
        out = subprocess.run([sys.executable, "-m", "ruff", *args, *NOTEBOOKS], cwd=ROOT,
                             check=False, capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def _copy_repository(dest: Path) -> None:
    """The repository as git has it (tools/mutants.py's copy)."""
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "tools" / "mutants.py")
    mutants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutants)
    mutants.copy_repository(dest)


def _edit(path: Path, edit) -> None:
    nb = json.loads(path.read_text())
    edit(nb["cells"])
    path.write_text(json.dumps(nb, indent=1))


def test_a_teams_run_saved_into_the_notebooks_passes_the_quick_tests(tmp_path):
    """A team's project after its run: the parameters cell edited (its data folder beside the
    project, as ~/ms-coco beside ~/coco-challenge on the hub, another network, sizes,
    VAL_FRACTION and SEED), the team block and a reading of its own written, both notebooks
    saved with the run's outputs. `pytest -m quick` checks the code, not these: it passes."""
    from cocochallenge import demo

    copy, data = tmp_path / "coco-challenge", tmp_path / "ms-coco"
    _copy_repository(copy)
    demo.make_demo_data(data, n_train=160, n_test=40, seed=7, progress=False)
    team = {"DATA_ROOT": str(data), "RUN_DIR": "runs/team", "BACKBONES": ["efficientnet_lite0"],
            "EPOCHS_FROZEN": 2, "EPOCHS_FINETUNE": 1, "BATCH_SIZE": 32, "VAL_FRACTION": 0.3,
            "SEED": 5, "OPTIONS": {"img_size": 96, "workers": 0}}  # fmt: skip

    def parameters(cells):
        cell = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
        text = "".join(cell["source"])
        for name, value in team.items():
            text = re.sub(rf"^{name} = .*$", f"{name} = {value!r}", text, flags=re.M)
        cell["source"] = text.splitlines(keepends=True)
        for c in cells:
            if "team" in c["metadata"].get("tags", []):
                c["source"] = ["## Team\n- **Names:** Ada and Alan\n"]

    _edit(copy / "challenge.ipynb", parameters)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCO_")}
    env.update(PYTHONPATH=str(copy), XDG_CACHE_HOME=str(tmp_path / "cache"),
               IPYTHONDIR=str(tmp_path / "ipython"))  # fmt: skip
    args = [sys.executable, "run.py", "--quiet", "--update-notebooks", "--data-root", str(data),
            "--run-dir", team["RUN_DIR"], "--backbones", "efficientnet_lite0"]  # fmt: skip
    for name in ("EPOCHS_FROZEN", "EPOCHS_FINETUNE", "BATCH_SIZE", "VAL_FRACTION", "SEED"):
        args += ["-p", name, repr(team[name])]
    args += ["-p", "OPTIONS", json.dumps(team["OPTIONS"])]
    out = subprocess.run(args, cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    reading = {"cell_type": "markdown", "metadata": {}, "source": ["We read 0.777 here."]}
    _edit(copy / "analysis.ipynb", lambda cells: cells.append(reading))
    saved = (copy / "challenge.ipynb").read_text()
    assert "runs/team" in saved and "VAL_FRACTION = 0.3" in saved and str(data) in saved
    quick = [sys.executable, "-m", "pytest", "-m", "quick", "-q", "-p", "no:randomly"]
    out = subprocess.run(quick, cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:]
    committed = [*quick[:3], "tests/test_committed_notebooks.py", "-k", "not team", "-q"]
    out = subprocess.run(committed, cwd=copy, env=env, capture_output=True, text=True)
    assert out.returncode == 1, out.stdout[-4000:]  # they compare what the team's run changed


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_are_at_most_45_cells_and_1500_words_of_markdown(name):
    cells = json.loads((ROOT / name).read_text())["cells"]
    words = sum(len("".join(c["source"]).split()) for c in cells if c["cell_type"] == "markdown")
    assert len(cells) <= 45 and words <= 1500, (len(cells), words)


def test_committed_notebooks_and_readme_show_the_cpu_settings_the_stop_prints():
    """One block of CPU settings (config.CPU_SETTINGS): the challenge notebook's first cell and
    the README show it as the lines the notebook prints when a run does not fit a CPU, and the
    first cell's command runs those settings."""
    from cocochallenge import config

    block = config.cpu_lines()
    first = "".join(json.loads((ROOT / "challenge.ipynb").read_text())["cells"][0]["source"])
    assert block in first and block in (ROOT / "README.md").read_text()
    command = " ".join(first[first.index("python run.py") :].split("```")[0].split())
    for name, value in config.CPU_SETTINGS.items():
        shown = json.dumps(value) if isinstance(value, list) else str(value)
        assert f"-p {name} {shown!r}" in command or f"-p {name} {shown}" in command, name
