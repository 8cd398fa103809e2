"""Make the references nbval compares the notebooks with: ``tests/nbval/``.

    python tools/nbval_references.py     # about two minutes on a 2-core CPU

The committed notebooks show a run on real photos, which a newcomer without the photos cannot
repeat. So nbval runs copies of them, ``tests/nbval/1_challenge.ipynb`` and
``2_analysis.ipynb``, in the small demo configuration of the root ``conftest.py``, and compares
the cells tagged ``nbval-check-output`` with outputs of that same configuration. This script
runs both notebooks that way (papermill, from ``tests/nbval/`` as nbval does) and keeps the
outputs of the checked cells only, without images (nbval does not compare them). Run it after
a change to the notebooks; ``tests/test_layout.py`` fails when the copies' code differs from
the notebooks'.
"""

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "nbval"
PAIRS = (("challenge.ipynb", "1_challenge.ipynb"), ("analysis.ipynb", "2_analysis.ipynb"))
CHECKED = "nbval-check-output"  # nbval's cell tag


def keep_checked_outputs(nb) -> None:
    """Clear every output but those of the checked cells, and their images."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if CHECKED not in cell.metadata.get("tags", []):
            cell.outputs, cell.execution_count = [], None
            continue
        for out in cell.outputs:
            for key in ("image/png", "image/jpeg"):
                out.get("data", {}).pop(key, None)
        cell.outputs = [o for o in cell.outputs if "data" not in o or o["data"]]
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)


def main() -> int:
    import importlib.util

    import nbformat
    import papermill

    spec = importlib.util.spec_from_file_location("nbval_config", ROOT / "conftest.py")
    config = importlib.util.module_from_spec(spec)  # the root conftest holds the configuration
    spec.loader.exec_module(config)
    os.environ.update(config.NBVAL)
    os.environ["COCO_HEADLESS"] = "1"
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for source, target in PAIRS:
            executed = Path(tmp) / target
            papermill.execute_notebook(
                str(ROOT / source),
                str(executed),
                cwd=str(OUT),
                progress_bar=False,
                kernel_name="python3",
            )
            nb = nbformat.read(executed, as_version=4)
            keep_checked_outputs(nb)
            nbformat.write(nb, OUT / target)
            print(f"{OUT / target}: references of {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
