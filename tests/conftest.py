import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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
    from cocochallenge import demo

    root = tmp_path_factory.mktemp("demo") / "ms-coco"
    demo.make_demo_data(root, n_train=240, n_test=40, seed=3, progress=False)
    return root


def write_labels(folder: Path, rows: dict) -> None:
    """Write ``{stem: [classes]}`` as ``.cls`` files (test helper)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, classes in rows.items():
        (folder / f"{stem}.cls").write_text("".join(f"{c}\n" for c in classes))


def load_run_data(root, split_path, val_fraction=0.1, seed=0, log=print):
    """The data cells of challenge.ipynb (scan, datasets, report, split), for tests of bad data."""
    import types

    import helpers as h
    from cocochallenge import data, scan, split

    paths = data.data_paths(root)
    found = scan.scan_data(root)
    train = h.COCOTrainImageDataset(paths["train_images"], paths["train_labels"])
    data.drop_images(train, found["skip"])
    test = h.COCOTestImageDataset(paths["test_images"])
    notes = []
    Y = data.labels_of(train, notes)
    scan.report_data(found, notes, log=log)
    stems = data.stems(train)
    inventory = data.inventory(train, Y)
    tr, va = split.load_or_make_split(stems, Y, split_path, val_fraction, seed, inventory)
    return types.SimpleNamespace(scan=found, train=train, test=test, Y=Y, stems=stems,
                                 inventory=inventory, train_idx=tr, val_idx=va)  # fmt: skip
