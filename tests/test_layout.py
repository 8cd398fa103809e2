"""The library's shape: course code in helpers.py, the rest in modules that import downward only."""
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cocochallenge"


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
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cocochallenge."))
    return out - {"__init__"}


def _graph() -> dict:
    return {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}


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


def test_the_check_can_see_a_cycle(tmp_path, monkeypatch):
    fake = {"a": {"b"}, "b": {"a"}}
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: fake)
    try:
        test_import_graph_has_no_cycle()
    except AssertionError as err:
        assert "a -> b -> a" in str(err) or "b -> a -> b" in str(err)
    else:
        raise AssertionError("a cycle went unnoticed")


def test_package_never_imports_the_course_file_and_modules_are_short_and_documented():
    for path in PACKAGE.glob("*.py"):
        text = path.read_text()
        tree = ast.parse(text)
        assert ast.get_docstring(tree), f"{path.name} opens without a docstring"
        assert len(text.splitlines()) <= 700, f"{path.name} is {len(text.splitlines())} lines"
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "helpers" not in names, f"{path.name} imports helpers.py (upward)"


def test_helpers_holds_the_course_blocks_only():
    tree = ast.parse((ROOT / "helpers.py").read_text())
    top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert top == {"COCOTrainImageDataset", "COCOTestImageDataset", "train_loop", "validation_loop",
                   "update_graphs"}


def test_notebook_cells_are_short_and_the_loop_is_in_sight():
    nb = json.loads((ROOT / "challenge.ipynb").read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    longest = max(len(c.splitlines()) for c in code if "parameters" not in c[:0] and not c.startswith("DATA_ROOT"))
    assert longest <= 22, longest
    text = "\n".join(code)
    for piece in ("h.train_loop(", "h.validation_loop(", "h.update_graphs(", "ckpt.save(", "ckpt.resume()",
                  "freeze_backbone(", "param_groups(", "warmup_cosine(", "for name in BACKBONES"):
        assert piece in text, piece


def test_notebooks_store_the_kernel_name_jupyterlab_writes():
    """Opened in JupyterLab, a notebook stored as "Python 3" is rewritten (and marked modified) at once."""
    import run
    for name in ("challenge.ipynb", "analysis.ipynb"):
        spec = json.loads((ROOT / name).read_text())["metadata"]["kernelspec"]
        assert spec == run.KERNELSPEC == {"display_name": "Python 3 (ipykernel)", "language": "python",
                                          "name": "python3"}, name


def test_run_py_takes_the_cpu_recipe_only_without_gpu_and_backbones(monkeypatch):
    import run
    monkeypatch.delenv("COCO_BACKBONES", raising=False)
    assert run.uses_cpu_recipe(None, cuda=False)
    assert not run.uses_cpu_recipe(None, cuda=True)                 # a GPU runs the notebook's defaults
    assert not run.uses_cpu_recipe("efficientnet_lite0", cuda=False)
    monkeypatch.setenv("COCO_BACKBONES", "resnet50")
    assert not run.uses_cpu_recipe(None, cuda=False)
    assert run.CPU_RECIPE["COCO_HEAD"] == "logistic" and run.CPU_RECIPE["COCO_EPOCHS_FINETUNE"] == "0"


def test_tensorboard_is_found_beside_the_kernels_python(monkeypatch):
    """JupyterLab started as .venv/bin/jupyter lab has no .venv/bin on PATH: the cell must not need it."""
    import sys

    from cocochallenge import config
    monkeypatch.setenv("PATH", "/nonexistent")
    found = Path(config.tensorboard_binary())
    beside = Path(sys.executable).parent / "tensorboard"
    assert found == beside if beside.exists() else found.name == "tensorboard"


def test_epoch_line_fits_a_jupyterlab_cell():
    from cocochallenge import checkpoints
    row = checkpoints.epoch_row("finetune", 11, 20, 1234.5, {"loss": 0.123456, "f1": 0.5},
                                {"loss": 0.123456, "f1": 0.56789, "mAP": 0.61234})
    line = checkpoints.epoch_line(row, 20, True)
    assert len(line) <= 90 and line.endswith("*best") and "12/20" in line
