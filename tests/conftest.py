import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

#: Real COCO photos in the challenge layout, beside the checkout (absent: those tests skip).
REAL = Path(os.environ.get("COCO_REAL_DEV", ROOT.parent / "shared" / "real-coco-dev"))


@pytest.fixture(scope="session")
def real_dev():
    if not (REAL / "ms-coco" / "labels" / "train").is_dir():
        pytest.skip(f"real photos not found at {REAL}")
    return REAL


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small generated dataset shared by the tests that only read it."""
    import helpers as h
    root = tmp_path_factory.mktemp("demo") / "ms-coco"
    h.make_demo_data(root, n_train=240, n_test=40, seed=3, progress=False)
    return root


def write_labels(folder: Path, rows: dict) -> None:
    """Write ``{stem: [classes]}`` as ``.cls`` files (test helper)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, classes in rows.items():
        (folder / f"{stem}.cls").write_text("".join(f"{c}\n" for c in classes))
