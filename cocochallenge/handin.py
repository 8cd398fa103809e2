"""The Moodle hand-in: one zip of a run, checked before it is written.

What a team uploads is graded on the notebooks (their outputs included), the code and the
results; checkpoints, feature caches and TensorBoard logs only make the file too large for
Moodle. Every check runs before the zip is written, and each problem is said in words.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from .files import CannotWrite, CorruptFile, atomic_path, held_note, load_json
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


def notebook_problems(path: Path, run_dir: Path) -> list[str]:
    """Why a notebook is not a clean top-to-bottom run of this run folder ([] when it is).

    Execution counts must read 1, 2, ... n down the code cells (a notebook run out of order,
    or half run, shows gaps), no cell may hold an error, and the outputs must name the run
    folder being packed. Cells from the one tagged ``handin`` on may be unexecuted: that is
    the cell that makes the zip.
    """
    try:
        nb = load_json(path)
    except CorruptFile:
        return [f"{path.name} is not a readable notebook (cut off or overwritten): run it again"]
    problems, counts = [], []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        if HANDIN_TAG in cell.get("metadata", {}).get("tags", []):
            break
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
            f"{' ...' if len(counts) > 12 else ''}); restart the kernel and run all cells"
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


def collect(run_dir: Path, project: Path) -> dict:
    """``{name in the zip: file}`` of everything a hand-in holds."""
    files = {}
    for name in NOTEBOOKS:  # run.py's executed copies first, else the ones in the project
        for cand in (run_dir / name, project / name):
            if cand.is_file():
                files[name] = cand
                break
    for name in PROJECT_FILES:
        if (project / name).is_file():
            files[name] = project / name
    for path in sorted((project / "cocochallenge").glob("*.py")):
        files[f"cocochallenge/{path.name}"] = path
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            files[f"run/{name}"] = run_dir / name
    for sub, pattern in (("figures", "*.png"), ("tables", "*.csv")):
        for path in sorted((run_dir / sub).glob(pattern)):
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
         ) -> Path | None:  # fmt: skip
    """Check the run and write ``<run>/handin.zip``; its path, or None after listing problems.

    The submission must read as strict JSON (no repeated image id) and be valid; when the test
    folder can be found (``test_dir``, or the data root the run recorded), every test image
    must have its prediction. When it cannot, the zip is written and the log says plainly
    that this was not checked, and why.
    """
    run_dir = Path(run_dir)
    project = Path(project) if project else Path(__file__).resolve().parents[1]
    out = Path(out) if out else run_dir / "handin.zip"
    files = collect(run_dir, project)
    required = (*NOTEBOOKS, "run/submission.json", "run/results.csv", "run/config.json",
                "run/environment.json")  # fmt: skip
    problems = [f"{name} is missing" for name in required if name not in files]
    held_note(run_dir, log)
    notebooks = [files[n] for n in NOTEBOOKS if n in files]
    for warning in warnings_for(notebooks):  # the report itself: said, not blocking
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
    for name in NOTEBOOKS:
        if name in files:
            problems += notebook_problems(files[name], run_dir)
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
        log(f"  {name:<44} {path.stat().st_size / 1e3:>9.1f} kB")
    return out
