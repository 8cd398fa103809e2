"""The project's shape: the course's code in helpers.py, a package that imports downward only,
notebooks a reader can follow, one style for everything."""

import ast
import difflib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cocochallenge"
HANDOUT = ROOT.parent / "shared" / "course-handout.py"
NOTEBOOKS = ("challenge.ipynb", "analysis.ipynb")
pytestmark = pytest.mark.quick


def _imports(path: Path) -> set[str]:
    """Package modules a file imports (relative or absolute, at top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1:
                out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("cocochallenge"):
                parts = node.module.split(".")
                out.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            out.update(
                a.name.split(".")[1] for a in node.names if a.name.startswith("cocochallenge.")
            )
    return out - {"__init__"}


def _graph() -> dict:
    return {
        p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")
    }


def _top_imports(path: Path) -> set[str]:
    """The top-level names of every module a file imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def _cells(name: str, kind: str = "code") -> list[str]:
    nb = json.loads((ROOT / name).read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind]


def test_import_graph_has_no_cycle():
    graph, state = _graph(), {}

    def visit(node, stack):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(stack + [node])}"
        state[node] = "open"
        for dep in graph.get(node, ()):
            visit(dep, stack + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])


def test_the_check_can_see_a_cycle(monkeypatch):
    fake = {"a": {"b"}, "b": {"a"}}
    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: fake)
    with pytest.raises(AssertionError, match="a -> b -> a|b -> a -> b"):
        test_import_graph_has_no_cycle()


def test_package_never_imports_the_course_file_and_modules_are_short_and_documented():
    for path in PACKAGE.glob("*.py"):
        text = path.read_text()
        assert ast.get_docstring(ast.parse(text)), f"{path.name} opens without a docstring"
        assert len(text.splitlines()) <= 700, f"{path.name} is {len(text.splitlines())} lines"
        assert "helpers" not in _top_imports(path), f"{path.name} imports helpers.py (upward)"


def test_helpers_is_the_course_code_and_stands_alone():
    """The handout's five blocks (and the private helpers of completions); libraries only."""
    tree = ast.parse((ROOT / "helpers.py").read_text())
    top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert top - {"_weights", "_rgb"} == {
        "COCOTrainImageDataset",
        "COCOTestImageDataset",
        "train_loop",
        "validation_loop",
        "update_graphs",
    }
    imports = _top_imports(ROOT / "helpers.py")
    assert imports <= {"os", "sys", "glob", "pathlib", "PIL", "torch", "tqdm"}, imports
    out = subprocess.run(
        [sys.executable, "-I", "-c", "import helpers"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
    )  # isolated: no project path, no package
    assert out.returncode == 0, out.stderr


def test_helpers_differs_from_the_handout_only_where_a_completion_is_marked():
    """The diff a grader makes: every changed or added stretch of helpers.py says `completion`
    (in it, or in the comment lines just above it); the rest is the handout, spacing included."""
    if not HANDOUT.exists():
        pytest.skip(f"the handout's blocks are not at {HANDOUT}")
    old, new = HANDOUT.read_text().splitlines(), (ROOT / "helpers.py").read_text().splitlines()
    ops = difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes()
    unmarked = []
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal" or (i1 == 0 and j1 == 0):  # the module docstring says what it is
            continue
        context = new[max(0, j1 - 4) : j2]
        if not any("completion" in line for line in context):
            unmarked.append(f"lines {j1 + 1}-{j2}: {new[j1:j2][:2] or old[i1:i2][:2]}")
    assert not unmarked, "changes without a `# completion:` comment:\n" + "\n".join(unmarked)
    changed = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")
    assert changed < 0.5 * len(new), changed  # mostly the handout's own lines


def test_notebook_cells_are_short_and_the_loop_is_in_sight():
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


def test_parameters_cell_holds_at_most_15_settings():
    cell = next(c for c in _cells("challenge.ipynb") if c.startswith("# data and run folder"))
    names = [n.targets[0].id for n in ast.parse(cell).body if isinstance(n, ast.Assign)]
    assert len(names) <= 15 and len(set(names)) == len(names), names
    assert all(line.startswith("#") or " = " in line for line in cell.splitlines() if line)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_lines_fit_a_jupyterlab_cell(name):
    long = [line for c in _cells(name) + _cells(name, "markdown") for line in c.splitlines()
            if len(line) > 100]  # fmt: skip
    assert not long, long[:3]


def test_fine_tuning_starts_from_the_best_frozen_head():
    """The notebook's `train_backbone`, run on stand-ins: phase 1 leaves its last epoch's head in
    the model, and phase 2 must start from the best epoch's head instead."""
    import torch
    from torch import nn

    cell = next(c for c in _cells("challenge.ipynb") if "def train_backbone(" in c)
    best, last = nn.Linear(2, 2), nn.Linear(2, 2)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(2, 2)

    class Frozen:  # the frozen phase's checkpoint: its best epoch is not its last
        best, best_epoch, history = 0.5, 1, []

        def load_best(self, module):
            module.load_state_dict(best.state_dict())

    def train_frozen(model, *args):
        model.head.load_state_dict(last.state_dict())
        return Frozen()

    seen = {}

    def fine_tune(model, *args):
        seen["start"] = model.head.weight.detach().clone()

    class Writer:
        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    stub = lambda *a, **k: None  # noqa: E731
    namespace = dict(
        run_dir=Path("/nonexistent"), time=__import__("time"), SEED=0, device="cpu",
        config=type("C", (), {"seed_everything": staticmethod(stub)}), amp_dtype=None,
        new_model=lambda name, prior=None: Model(), loaders_for=stub, cfg={"progress": False,
        "frozen_only": []}, SummaryWriter=Writer, train_frozen=train_frozen, fine_tune=fine_tune,
        keep_best=lambda model, name, frozen, tuned: (model, "frozen"), EPOCHS_FINETUNE=1,
        y_train=__import__("numpy").zeros((1, 80)), ids={},
        runs=type("R", (), {"save_model_scores": staticmethod(lambda *a, **k: {})}),
    )  # fmt: skip
    exec(compile(cell, "challenge.ipynb", "exec"), namespace)
    namespace["train_backbone"]("b", Path("/nonexistent"))
    assert "start" in seen, "fine-tuning never ran"
    assert torch.equal(seen["start"], best.weight), "fine-tuning started from the last frozen head"


def test_notebooks_store_the_kernel_name_jupyterlab_writes():
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


def test_run_py_takes_the_cpu_recipe_only_with_data_no_gpu_and_no_backbone():
    import argparse

    import run

    args = lambda **k: argparse.Namespace(
        **{
            "data_root": "d",
            "backbones": None,  # noqa: E731
            "parameter": [],
            "smoke": False,
            **k,
        }
    )
    assert run.uses_cpu_recipe(args(), cuda=False)
    assert not run.uses_cpu_recipe(args(), cuda=True)  # a GPU runs the notebook's defaults
    assert not run.uses_cpu_recipe(args(backbones="efficientnet_lite0"), cuda=False)
    assert not run.uses_cpu_recipe(args(parameter=[("BACKBONES", "['resnet50']")]), cuda=False)
    assert not run.uses_cpu_recipe(args(data_root=None), cuda=False)  # the demo run


def test_tensorboard_is_found_beside_the_kernels_python(monkeypatch):
    """JupyterLab started as .venv/bin/jupyter lab has no .venv/bin on PATH: the cell needs none."""
    from cocochallenge import config

    monkeypatch.setenv("PATH", "/nonexistent")
    found = Path(config.tensorboard_binary())
    beside = Path(sys.executable).parent / "tensorboard"
    assert found == beside if beside.exists() else found.name == "tensorboard"


def test_epoch_line_fits_a_jupyterlab_cell():
    from cocochallenge import checkpoints

    row = checkpoints.epoch_row(
        "finetune",
        11,
        20,
        1234.5,
        {"loss": 0.123456},
        {"loss": 0.123456, "f1": 0.56789, "mAP": 0.61234},
    )
    line = checkpoints.epoch_line(row, 20, True)
    assert len(line) <= 90 and line.endswith("*best") and "12/20" in line


def test_no_file_edits_the_import_path():
    """`pip install -e .` makes the package and helpers.py importable: nothing inserts paths."""
    skip = {".venv", "runs", "data"}
    files = [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)]
    edit = "sys.path" + ".insert"
    assert [p.name for p in files if edit in p.read_text()] == []


def test_ruff_is_clean_on_the_code_and_the_notebooks():
    """The style pyproject.toml declares: `ruff check`, `ruff format --check`, 100 columns."""
    for args in (["check", "."], ["format", "--check", "."]):
        out = subprocess.run(
            [sys.executable, "-m", "ruff", *args],
            cwd=ROOT,
            check=False,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


@pytest.mark.parametrize("pair", [("challenge.ipynb", "1_challenge.ipynb"),
                                  ("analysis.ipynb", "2_analysis.ipynb")])  # fmt: skip
def test_nbval_copies_run_the_notebooks_own_code(pair):
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
def test_the_prose_quotes_only_numbers_its_outputs_show(name):
    """The reading prose of the committed notebooks ("*In this run*" cells and the conclusions)
    is written for their committed run: every decimal it quotes stands in the outputs of the
    section it refers to (report.unbacked_numbers, which the hand-in also runs)."""
    from cocochallenge import report

    nb = json.loads((ROOT / name).read_text())
    reading = [c for c in nb["cells"] if c["cell_type"] == "markdown"
               and "".join(c["source"]).startswith("*In this run")]  # fmt: skip
    assert name == "challenge.ipynb" or len(reading) >= 10
    assert report.unbacked_numbers(nb) == []


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_hold_no_injected_parameters(name):
    """papermill's injected cell would sit under the parameters cell and override a student's
    edit of it; run.py --update-notebooks removes it when it copies a run's notebooks."""
    import nbformat

    import run

    cells = json.loads((ROOT / name).read_text())["cells"]
    tags = [t for c in cells for t in c.get("metadata", {}).get("tags", [])]
    assert "injected-parameters" not in tags and tags.count("parameters") == 1
    counts = [c["execution_count"] for c in cells if c["cell_type"] == "code"]
    ran = [n for n in counts if n is not None]
    assert ran == list(range(1, len(ran) + 1)), counts  # one run, top to bottom
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("A = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("# Parameters\nA = 2",
                                          metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("A")]  # fmt: skip
    for count, cell in enumerate(nb.cells, 1):
        cell.execution_count = count
    nb.cells[2].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "1"},
                                                  execution_count=3)]  # fmt: skip
    path = ROOT / "runs" / "_injected_test.ipynb"
    path.parent.mkdir(exist_ok=True)
    try:
        nbformat.write(nb, path)
        run.without_injected_cell(path)
        cells = nbformat.read(path, as_version=4).cells
        assert [c.source for c in cells] == ["A = 1", "A"]
        assert [c.execution_count for c in cells] == [1, 2]  # the hand-in's 1..n
        assert cells[1].outputs[0]["execution_count"] == 2
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_only_the_parameters_cell_sets_the_parameters(name):
    """Open the notebook, edit the parameters cell, run all: the edited values are in force, for
    no later cell assigns a parameter again (the tests' COCO_<NAME> variables go through
    config.settings, which names them in the settings table)."""
    cells = json.loads((ROOT / name).read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    params = next(c for c in code if "parameters" in c.get("metadata", {}).get("tags", []))
    names = {t.id for n in ast.parse("".join(params["source"])).body
             if isinstance(n, ast.Assign) for t in n.targets}  # fmt: skip
    assert "RUN_DIR" in names
    for cell in code:
        if cell is params:
            continue
        source = "\n".join(
            line
            for line in "".join(cell["source"]).splitlines()
            if not line.lstrip().startswith("%")
        )  # IPython magics are not Python
        assigned = {t.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Assign)
                    for t in n.targets if isinstance(t, ast.Name)}  # fmt: skip
        assert not assigned & names, (assigned & names, source[:80])


def test_saved_notebooks_keep_the_printed_lines_not_the_progress_bar_frames():
    """run.py saves what a terminal shows: consecutive text outputs joined, bars redrawn with
    carriage returns and cleared when done gone, the epoch lines kept (JupyterLab folds a cell
    with more than 50 outputs behind "Show more outputs")."""
    import nbformat

    import run

    stream = lambda text: nbformat.v4.new_output("stream", name="stdout", text=text)  # noqa: E731
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [stream("\nlite0: new\n"), stream("\r 10%|#  | 1/9"), stream("\r 90%|## | 8/9"),
                    stream("\r           \r"), stream("  frozen 1/2  loss 0.1\n"),
                    stream("\rfeatures: 50%"), stream("\r             \r"),
                    nbformat.v4.new_output("execute_result", data={"text/plain": "table"}),
                    stream("after\n")]  # fmt: skip
    nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_markdown_cell("prose")])
    run.tidy_outputs(nb)
    nbformat.validate(nb)  # a markdown cell has no outputs field
    texts = [o.get("text") for o in cell.outputs]
    assert texts == ["\nlite0: new\n  frozen 1/2  loss 0.1\n", None, "after\n"]
    assert run._overprint("abcdef\rxy") == "xycdef"  # a shorter write leaves the rest


def test_the_package_and_pyproject_say_the_same_version():
    """Each run folder records cocochallenge.__version__: it must be the version pip installs."""
    import re

    import cocochallenge

    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert declared and declared.group(1) == cocochallenge.__version__
