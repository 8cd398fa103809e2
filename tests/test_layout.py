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


def test_fine_tuning_starts_from_the_best_frozen_head_of_the_better_head():
    """The notebook's `train_frozen`, run on stand-ins: each head's phase 1 leaves its last
    epoch's weights in the model; the head with the higher best validation mAP must be kept,
    and with its best epoch's weights, where fine-tuning starts."""
    import numpy as np
    import torch

    from cocochallenge import models

    cell = next(c for c in _cells("challenge.ipynb") if "def train_frozen(" in c)
    model, _ = models.build_model("efficientnet_lite0", pretrained=False)
    best = {"mlp": 0.4, "linear": 0.6}
    weights = {}

    class Checkpoint:  # a phase whose best epoch is not its last
        def __init__(self, kind, head):
            self.best, self.kind = best[kind], kind
            weights[kind] = {k: torch.randn_like(v) for k, v in head.state_dict().items()}

        def load_best(self, module):
            module.load_state_dict(weights[self.kind])

    def train_head(model, feats, folder, epochs, writer, phase, **kwargs):
        kind = phase.split("_")[1]
        with torch.no_grad():  # the last epoch's weights: not the best
            for p in model.head.parameters():
                p.fill_(7.0)
        return Checkpoint(kind, model.head)

    class Writer:
        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    namespace = dict(
        models=models, runs=__import__("cocochallenge.runs").runs, SummaryWriter=Writer,
        config=type("C", (), {"seed_everything": staticmethod(lambda seed: None)}), SEED=0,
        cfg={"dropout": 0.2}, y_train=np.zeros((4, 80)), EPOCHS_FROZEN=1, run_dir=Path("/x"),
        frozen_features=lambda *a: {}, train_head=train_head,
    )  # fmt: skip
    exec(compile(cell, "challenge.ipynb", "exec"), namespace)
    kind, frozen, tried = namespace["train_frozen"](model, "efficientnet_lite0", Path("/x"))
    assert kind == "linear" and tried == best and len(model.head) == 1
    for key, value in model.head.state_dict().items():
        assert torch.equal(value, weights["linear"][key]), "the kept head is not at its best epoch"


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


def test_ruff_is_clean_on_the_code():
    """The style pyproject.toml declares: `ruff check`, `ruff format --check`, 100 columns. The
    notebooks' cells are a team's to edit: test_committed_notebooks.py checks the committed ones."""
    for args in (["check", "."], ["format", "--check", "."]):
        out = subprocess.run([sys.executable, "-m", "ruff", *args, "--extend-exclude", "*.ipynb"],
                             cwd=ROOT, check=False, capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_run_py_removes_the_injected_cell_and_numbers_the_cells_again(tmp_path):
    """papermill's injected cell would sit under the parameters cell and override a student's
    edit of it: run.py --update-notebooks removes it, and the counts read 1..n again."""
    import nbformat

    import run

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("A = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("# Parameters\nA = 2",
                                          metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("A")]  # fmt: skip
    for count, cell in enumerate(nb.cells, 1):
        cell.execution_count = count
    nb.cells[2].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "1"},
                                                  execution_count=3)]  # fmt: skip
    path = tmp_path / "injected.ipynb"
    nbformat.write(nb, path)
    run.without_injected_cell(path)
    cells = nbformat.read(path, as_version=4).cells
    assert [c.source for c in cells] == ["A = 1", "A"]
    assert [c.execution_count for c in cells] == [1, 2]  # the hand-in's 1..n
    assert cells[1].outputs[0]["execution_count"] == 2


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
