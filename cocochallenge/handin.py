"""The Moodle hand-in: one zip of a run, checked before it is written.

What a team uploads is graded on the notebooks (their outputs included), the code and the
results; checkpoints, feature caches and TensorBoard logs only make the file too large for
Moodle. Every check runs before the zip is written, and each problem is said in words.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from pathlib import Path

from .files import (
    CannotWrite,
    CorruptFile,
    atomic_path,
    held_note,
    load_json,
    shown_path,
    started,
)
from .report import warnings_for
from .submission import SubmissionError, read_submission, validate_submission

#: Files of the project packed beside the run (the library and how to run it).
PROJECT_FILES = (
    "helpers.py",
    "cpu_recipe.py",
    "run.py",
    "pyproject.toml",
    "requirements.txt",
    "requirements-dev.txt",
    "README.md",
    "tools/evidence/evidence.csv",  # the analysis notebook reads it
    "tools/evidence/README.md",  # and cites how it was measured
)
#: Files of the run folder packed (with figures/*.png and tables/*.csv).
RUN_FILES = (
    "submission.json",
    "results.csv",
    "thresholds.json",
    "config.json",
    "environment.json",
    "summary.json",
    "split.json",
)
NOTEBOOKS = ("challenge.ipynb", "analysis.ipynb")
HANDIN_TAG = "handin"


def read_notebook(path: Path) -> dict | None:
    """The notebook at ``path``; None when it is not one (cut off, not UTF-8, ``{}``, ``[]``)."""
    try:
        nb = load_json(path)
    except CorruptFile:
        return None
    cells = nb.get("cells") if isinstance(nb, dict) else None
    if isinstance(cells, list) and all(isinstance(c, dict) and {"cell_type", "source"} <= set(c)
                                       for c in cells):  # fmt: skip
        return nb
    return None


def unfinished(path: Path) -> Path:
    """Where ``run.py`` saves its executed copy of the notebook ``path`` (in the run folder)
    until it has run to its end: only then does the copy replace ``path``. A run that stopped
    leaves it there, and ``path`` as the last complete run's, which the hand-in packs."""
    return path.with_name(f"{path.stem}.unfinished{path.suffix}")


def notebook_problems(path: Path, run_dir: Path) -> list[str]:
    """Why a notebook is not a clean top-to-bottom run of this run folder ([] when it is).

    Execution counts must read 1, 2, ... n down the code cells (a notebook run out of order,
    or half run, shows gaps), no cell may hold an error, and the outputs must name the run
    folder being packed. Cells from the one tagged ``handin`` on may be unexecuted: that is
    the cell that makes the zip.
    """
    nb = read_notebook(path)
    if nb is None:
        return [f"{path} is not a readable notebook (cut off or overwritten): run it again "
                "(python run.py, or Run All in Jupyter and save)"]  # fmt: skip
    problems, counts = [], []
    for cell in _cells_above_handin(nb):
        counts.append(cell.get("execution_count"))
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                problems.append(
                    f"{path.name}: a cell ends with {out.get('ename')}: "
                    f"{out.get('evalue', '')[:120]}"
                )
    if counts != list(range(1, len(counts) + 1)):
        problems.append(
            f"{path.name}: not run top to bottom in one go (execution counts {counts[:12]}"
            f"{' ...' if len(counts) > 12 else ''}): {RERUN}"
        )
    text = json.dumps([c.get("outputs", []) for c in nb["cells"] if c["cell_type"] == "code"])
    names = {str(run_dir), str(run_dir.resolve())}
    try:
        names.add(str(run_dir.resolve().relative_to(Path.cwd().resolve())))
    except ValueError:
        pass
    if not any(n in text for n in names):
        problems.append(
            f"{path.name}: its outputs never name the run folder {run_dir}: it ran on another one"
        )
    return problems


def _cells_above_handin(nb: dict) -> list[dict]:
    """The code cells above the one tagged ``handin`` (all of them without one), empty ones left
    out: JupyterLab does not send an empty cell to the kernel."""
    cells = []
    for cell in nb["cells"]:
        if HANDIN_TAG in cell.get("metadata", {}).get("tags", []):
            break
        if cell["cell_type"] == "code" and "".join(cell["source"]).strip():
            cells.append(cell)
    return cells


#: The one step that makes a notebook one run, top to bottom, saved (JupyterLab's menus).
RERUN = "Kernel > Restart Kernel and Run All Cells, then File > Save"


def kernel_problems(path: Path, history: list[str], started: float | None) -> list[str]:
    """Why the saved notebook ``path`` is not this kernel's run of every cell above the running
    one ([] when it is), with the one step to take.

    A kernel cannot save its own notebook, so the hand-in cell checks the saved file: its code
    cells above the hand-in cell must be the cells this kernel ran, in order, once each,
    numbered 1..n, with nothing run since but the hand-in cell (again, after a refusal), and
    the file saved after the kernel started (``started``, seconds since the epoch). ``history``
    is the kernel's cells as they ran, the running one last, from index 1 (IPython's
    ``history_manager.input_hist_raw``).
    """
    nb = load_json(path)
    cells = _cells_above_handin(nb)
    ran = [text.rstrip() for text in history[1:-1]]
    while ran and ran[-1] == history[-1].rstrip():  # the hand-in cell, refused before
        ran.pop()
    if len(ran) != len(cells):
        return [f"{path.name}: this kernel ran {len(ran)} cells before this one, not the "
                f"{len(cells)} above it once each: {RERUN}, then run this cell again"]  # fmt: skip
    counts = [cell.get("execution_count") for cell in cells]
    same = all(n is None or (0 < n <= len(ran) and ran[n - 1] == "".join(cell["source"]).rstrip())
               for n, cell in zip(counts, cells))  # fmt: skip
    done = [n for n in counts if n is not None]
    fresh = started is None or path.stat().st_mtime >= started
    if same and fresh and counts == list(range(1, len(cells) + 1)):
        return []
    save = "File > Save, then run this cell again"
    if same and done != list(range(1, len(done) + 1)):  # as saved, the kernel's run: not in order
        return [f"{path.name}: this kernel did not run the cells above once each, in order "
                f"(execution counts {counts[:12]}): {RERUN}, then run this cell again"]  # fmt: skip
    if fresh and not same:  # saved since the kernel started, yet not its run: early, or messy
        save += f" (if this repeats: {RERUN}, then run this cell again)"
    return [f"{path.name} as saved is not yet this kernel's run of the cells above (a kernel "
            f"cannot save its own notebook): {save}"]  # fmt: skip


def saved_before_results(files: dict) -> list[str]:
    """The challenge notebook of ``files`` (:func:`collect`) must be saved after the run's
    results were written: else its saved file shows an earlier run, or none ([] when it is)."""
    made = files.get("challenge.ipynb")
    results = [p for n, p in files.items() if n.startswith("run/") and n[4:] in RUN_FILES]
    newest = max(results, key=lambda p: p.stat().st_mtime, default=None)
    if made is None or newest is None or made.stat().st_mtime >= newest.stat().st_mtime:
        return []
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(newest.stat().st_mtime))
    return [f"{shown_path(made)} was saved before the run's results ({newest.name}, {when}): "
            "in challenge.ipynb, File > Save, then run this cell again"]  # fmt: skip


def collect(run_dir: Path, project: Path, beside: Path | None = None, log=print) -> dict:
    """``{name in the zip: file}`` of everything a hand-in holds.

    The notebooks: run.py's executed copies in the run folder first, else the project's;
    with ``beside`` (the folder of the notebook that packs, in JupyterLab) the ones there, as
    the team sees them, the challenge notebook from the run folder only where that copy was
    saved later (a run made by run.py). A run-folder file that is a link to a file outside the
    run folder is left out, with a line that says so: the zip would hold whatever it points to.
    """
    files, inside = {}, run_dir.resolve()

    def of_run(path: Path) -> bool:
        if not path.is_file():
            return False
        if path.resolve().is_relative_to(inside):
            return True
        log(f"not packed: {path} is a link to {path.resolve()}, outside the run folder")
        return False

    for name in NOTEBOOKS:
        if beside is None:  # run.py's executed copies first, else the project's
            found = [p for p in (run_dir / name, project / name) if p.is_file()]
        else:  # the team's, beside the packing one; run.py's challenge notebook if saved later
            mine = (
                (beside / name, run_dir / name) if name == "challenge.ipynb" else (beside / name,)
            )
            found = sorted((p for p in mine if p.is_file()), key=lambda p: -p.stat().st_mtime)
        found = [p for p in found if p.parent.resolve() != inside or of_run(p)]
        if found:
            files[name] = found[0]
    for name in PROJECT_FILES:
        if (project / name).is_file():
            files[name] = project / name
    for path in sorted((project / "cocochallenge").glob("*.py")):
        files[f"cocochallenge/{path.name}"] = path
    for name in RUN_FILES:
        if of_run(run_dir / name):
            files[f"run/{name}"] = run_dir / name
    for sub, pattern in (("figures", "*.png"), ("tables", "*.csv")):
        for path in sorted((run_dir / sub).glob(pattern)):
            if of_run(path):
                files[f"run/{sub}/{path.name}"] = path
    return files


def find_test_dir(run_dir: Path, given: Path | str | None = None) -> tuple[Path | None, str]:
    """``(test folder or None, how it was found or why not)``: the folder given, else the data
    root the run recorded (summary.json, then config.json; a demo run's generated folder)."""
    if given:
        path = Path(given)
        return (path, "given") if path.is_dir() else (None, f"{path} (given) is not a folder")
    for name in ("summary.json", "config.json"):
        try:
            record = load_json(run_dir / name) if (run_dir / name).is_file() else {}
        except CorruptFile:
            continue  # pack names it
        root = record.get("data_root") if isinstance(record, dict) else None
        if root == "demo":
            root = record.get("demo_dir")
        if root:
            path = Path(root) / "images" / "test-resized"
            if path.is_dir():
                return path, f"from {name}"
            return None, f"{name} names {path}, which is not on this machine"
    return None, "neither summary.json nor config.json of the run names a data folder"


def pack(run_dir: Path | str, out: Path | str | None = None, max_mb: float = 20.0,
         project: Path | str | None = None, log=print, test_dir: Path | str | None = None,
         notebook: Path | str | None = None, history: list[str] | None = None,
         ) -> Path | None:  # fmt: skip
    """Check the run and write ``<run>/handin.zip``; its path, or None after listing problems.

    The submission must read as strict JSON (no repeated image id) and be valid; when the test
    folder can be found (``test_dir``, or the data root the run recorded), every test image
    must have its prediction. When it cannot, the zip is written and the log says plainly
    that this was not checked, and why.

    ``notebook``: the notebook whose cell calls this, in a kernel (``"analysis.ipynb"``). The
    notebooks packed are then those beside it, as the team sees them (:func:`collect`): that
    one must be saved as this kernel's run of every cell above the calling one
    (:func:`kernel_problems`; ``history``: the kernel's cells, IPython's by default), and the
    challenge notebook saved after the run's results were written.
    """
    run_dir = Path(run_dir)
    project = Path(project) if project else Path(__file__).resolve().parents[1]
    out = Path(out) if out else run_dir / "handin.zip"
    beside = Path(notebook).resolve().parent if notebook else None
    files = collect(run_dir, project, beside, log)
    required = (*NOTEBOOKS, "run/submission.json", "run/results.csv", "run/config.json",
                "run/environment.json")  # fmt: skip
    problems = [f"{name} is missing" for name in required if name not in files]
    held_note(run_dir, log)
    notebooks = {files[n]: read_notebook(files[n]) for n in NOTEBOOKS if n in files}
    for path in notebooks:
        later = unfinished(run_dir / path.name)
        if later.is_file() and later.stat().st_mtime > path.stat().st_mtime:
            log(f"note: {later} is a later run that stopped before its end; packed: {path}")
    readable = {path: nb for path, nb in notebooks.items() if nb is not None}  # else a problem
    for warning in warnings_for(readable):  # the report itself: said, not blocking
        log(f"WARNING: {warning}")
    for name, path in files.items():
        if name.startswith("run/") and name.endswith(".json") and name != "run/submission.json":
            try:
                load_json(path)
            except CorruptFile as err:
                problems.append(str(err))
    if "run/submission.json" in files:
        folder, how = find_test_dir(run_dir, test_dir)
        if test_dir and folder is None:
            problems.append(f"the test folder {how}: give images/test-resized with --test-dir")
        try:
            validate_submission(read_submission(files["run/submission.json"]), folder)
            if folder is None and not test_dir:
                log(
                    f"NOT CHECKED: whether every test image has a prediction ({how}); the "
                    "form of the submission was checked. Give the test folder with --test-dir."
                )
        except SubmissionError as err:
            problems.append(f"submission.json is not valid: {err}")
    here = []
    if notebook:  # packed from a notebook's cell: its saved file, the challenge notebook's
        if history is None:
            history = sys.modules["IPython"].get_ipython().history_manager.input_hist_raw
        here = kernel_problems(Path(notebook), history, started(os.getpid()))
        problems += saved_before_results(files)
    for name in NOTEBOOKS:
        if name in files:
            mine = notebook is not None and files[name].samefile(notebook)
            problems += (mine and here) or notebook_problems(files[name], run_dir)
    size = sum(p.stat().st_size for p in files.values())
    if size > max_mb * 1e6:  # deflate shrinks text, hardly the PNG figures
        problems.append(
            f"{size / 1e6:.1f} MB of files before compression, over the {max_mb:g} MB limit"
        )
    if problems:
        log("hand-in NOT written:\n  " + "\n  ".join(problems))
        return None
    try:
        with atomic_path(out) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name, path in files.items():
                    zf.write(path, name)
    except CannotWrite as err:
        log(f"hand-in NOT written: {err}")
        return None
    zip_size = out.stat().st_size
    if zip_size > max_mb * 1e6:
        out.unlink()
        log(
            f"hand-in NOT written: the zip is {zip_size / 1e6:.1f} MB, over the {max_mb:g} MB limit"
        )
        return None
    log(f"hand-in: {out} ({zip_size / 1e6:.2f} MB, {len(files)} files)")
    for name, path in files.items():
        saved = time.strftime("saved %Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        what = f"  {shown_path(path)}, {saved}" if name in NOTEBOOKS else ""
        log(f"  {name:<44} {path.stat().st_size / 1e3:>9.1f} kB{what}")
    return out
