"""Faulty inputs, interrupted runs and safe outputs: each case built in a temporary folder."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import helpers as h
from cocochallenge import data as cdata
from cocochallenge import files, runs, scan, submission, transforms
from conftest import load_run_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def data(tmp_path, demo_root):
    """A private, writable copy of the demo data to break."""
    root = tmp_path / "ms-coco"
    shutil.copytree(demo_root, root)
    return root


def _first(root, folder="images/train-resized", suffix=".jpg"):
    return sorted((root / folder).glob(f"*{suffix}"))[0]


# ---- bad data roots ---------------------------------------------------------------------
def test_missing_root_shows_layout_and_course_path(tmp_path):
    with pytest.raises(cdata.DataError) as err:
        load_run_data(tmp_path / "nowhere", tmp_path / "split.json")
    assert "does not exist" in str(err.value) and "/home/jovyan/ms-coco" in str(err.value)
    assert "images/train-resized" in str(err.value)


@pytest.mark.parametrize("sub", ["images/train-resized", "labels/train", "images/test-resized"])
def test_missing_or_empty_subfolder(data, sub):
    shutil.rmtree(data / sub)
    with pytest.raises(cdata.DataError, match="is missing"):
        scan.scan_data(data)
    (data / sub).mkdir()
    with pytest.raises(cdata.DataError, match="is empty"):
        scan.scan_data(data)


def test_given_root_is_never_replaced_by_demo_data(tmp_path):
    with pytest.raises(cdata.DataError):
        cdata.resolve_data_root(tmp_path / "typo", tmp_path / "demo")
    assert not (tmp_path / "demo").exists()


# ---- bad images -----------------------------------------------------------------------
def _truncate(p):
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


@pytest.mark.parametrize(
    "damage,reason",
    [
        (_truncate, "truncated or corrupt JPEG"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"this is not an image at all" * 20), "not an image"),
    ],
)
def test_unreadable_training_image_is_skipped_with_report(data, tmp_path, damage, reason):
    bad = _first(data)
    damage(bad)
    lines = []
    run = load_run_data(data, tmp_path / "split.json", 0.2, log=lines.append)
    assert bad.stem in run.scan["skip"] and bad.stem not in run.stems
    assert any(str(bad) in line and reason in line for line in lines)
    assert len(run.train) == len(run.Y) == len(run.train_idx) + len(run.val_idx)
    for i in range(len(run.train)):  # every remaining image loads
        run.train[i]


def test_many_unreadable_images_stop_the_run(data):
    for p in sorted((data / "images/train-resized").glob("*.jpg"))[:20]:
        p.write_bytes(b"")
    with pytest.raises(cdata.DataError, match="looks incomplete"):
        scan.scan_data(data)


def test_png_named_jpg_is_used_with_a_note(data, tmp_path):
    p = _first(data)
    Image.open(p).convert("RGB").save(p, format="PNG")
    lines = []
    run = load_run_data(data, tmp_path / "split.json", 0.2, log=lines.append)
    assert p.stem in run.stems
    assert any("not a JPEG despite its name (PNG" in line for line in lines)
    assert run.train[run.stems.index(p.stem)][0].mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "I;16"])
def test_unusual_colour_modes_simply_work(data, mode):
    p = _first(data)
    img = Image.open(p).convert("RGB")
    if mode == "P":
        img = img.convert("P", palette=Image.ADAPTIVE)
    elif mode == "I;16":
        img = img.convert("L").convert("I;16")
    else:
        img = img.convert(mode)
    fmt = "PNG" if mode in ("P", "RGBA", "I;16") else "JPEG"
    img.save(p, format=fmt)
    assert scan.scan_data(data)["skip"] == set()
    ds = h.COCOTrainImageDataset(data / "images/train-resized", data / "labels/train")
    t = transforms.build_transform({"size": 64, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    x = t(ds[cdata.stems(ds).index(p.stem)][0])
    assert x.shape == (3, 64, 64)


def test_image_failing_at_load_time_names_the_file(tmp_path):
    p = tmp_path / "000000000001.jpg"
    p.write_bytes(b"\xff\xd8garbage")
    with pytest.raises(cdata.DataError, match="000000000001.jpg"):
        cdata.load_rgb(p)


# ---- label files ----------------------------------------------------------------------
def test_duplicate_blank_and_crlf_labels_work(data, tmp_path):
    f = _first(data, "labels/train", ".cls")
    f.write_bytes(b"3\r\n\r\n3\r\n17\r\n")
    lines = []
    run = load_run_data(data, tmp_path / "split.json", 0.2, log=lines.append)
    row = run.Y[run.stems.index(f.stem)]
    assert np.flatnonzero(row).tolist() == [3, 17]
    assert any(f.name in line and "repeated" in line for line in lines)


def test_bad_label_stops_before_training(data, tmp_path):
    f = _first(data, "labels/train", ".cls")
    f.write_text("4\nperson\n")
    with pytest.raises(cdata.DataError, match=rf"{f.name}, line 2"):
        load_run_data(data, tmp_path / "split.json")


def test_image_without_label_and_label_without_image(data, tmp_path):
    img = _first(data)
    (data / "labels/train" / f"{img.stem}.cls").unlink()
    orphan = sorted((data / "labels/train").glob("*.cls"))[-1]
    (data / "images/train-resized" / f"{orphan.stem}.jpg").unlink()
    lines = []
    run = load_run_data(data, tmp_path / "split.json", 0.2, log=lines.append)
    assert img.stem not in run.stems and orphan.stem not in run.stems
    assert any("no label file" in line and img.stem in line for line in lines)
    assert any(orphan.name in line and "is missing" in line for line in lines)


# ---- test folder ----------------------------------------------------------------------
def test_test_names_must_be_leaderboard_ids(data):
    p = _first(data, "images/test-resized")
    p.rename(p.with_name("IMG_0001.jpg"))
    with pytest.raises(cdata.DataError, match="12-digit"):
        scan.scan_data(data)


def test_test_images_overlapping_training_stop(data):
    p = _first(data)
    shutil.copy(p, data / "images/test-resized" / p.name)
    with pytest.raises(cdata.DataError, match="also appear in the training data"):
        scan.scan_data(data)


def test_unreadable_test_image_stops(data):
    _truncate(_first(data, "images/test-resized"))
    with pytest.raises(cdata.DataError, match="test images cannot be used"):
        scan.scan_data(data)


# ---- safe outputs ---------------------------------------------------------------------
@pytest.mark.quick
def test_disk_full_half_way_through_keeps_old_submission(tmp_path, monkeypatch):
    """The disk fills up after half the new file is written: the old submission stays whole.
    A write_submission that wrote in place would leave a torn, unreadable file here."""
    d = tmp_path / "test"
    d.mkdir()
    for i in (1, 2):
        Image.new("RGB", (4, 4)).save(d / f"00000000000{i}.jpg")
    path = submission.write_submission({"000000000001": [1], "000000000002": [3]},
                                       tmp_path / "sub.json", d)  # fmt: skip
    before = path.read_bytes()
    real = Path.write_text

    def full(self, text, *a, **k):
        real(self, text[: len(text) // 2])  # half of it reaches the disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space"):
        submission.write_submission({"000000000001": [2], "000000000002": [4]}, path, d)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert submission.read_submission(path) == {"000000000001": [1], "000000000002": [3]}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.quick
def test_checkpoint_write_failure_keeps_previous(tmp_path, monkeypatch):
    path = files.torch_save_atomic({"epoch": 1}, tmp_path / "last.pt")

    def boom(obj, f, *a, **k):  # half a checkpoint reaches the disk, then the run dies
        f.write(b"partial") if hasattr(f, "write") else Path(f).write_bytes(b"partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        files.torch_save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert files.load_torch(path)["epoch"] == 1 and len(list(tmp_path.iterdir())) == 1


def test_run_folder_records_config_versions_and_split(tmp_path, demo_root):
    cfg = {"run_dir": str(tmp_path / "run"), "seed": 3}
    run_dir = runs.prepare_run_dir(cfg)
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["packages"]["torch"] == torch.__version__ or torch.__version__.startswith(
        env["packages"]["torch"] + "+"
    )
    import cocochallenge

    assert env["library_version"] == cocochallenge.__version__ and env["git_commit"]
    assert json.loads((run_dir / "config.json").read_text()) == cfg
    run = load_run_data(demo_root, run_dir / "split.json", 0.2)
    split = json.loads((run_dir / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == sorted(run.stems)


# ---- kill and resume ------------------------------------------------------------------
#: Runs the challenge notebook's own code cells in a process that can be killed (the
#: TensorBoard cell and IPython magics are left out; ``display`` as in a notebook), up to the
#: cell holding argv[2] if given.
DRIVER = r"""
import json, os, sys
import matplotlib
matplotlib.use("Agg")
os.chdir(sys.argv[1])
import torch
torch.set_num_threads(1)
cells = [c for c in json.load(open("challenge.ipynb"))["cells"] if c["cell_type"] == "code"]
from IPython.display import display  # a notebook's own
namespace = {"__name__": "__main__", "display": display}
for cell in cells:
    src = "".join(cell["source"])
    if "nbval-skip" in cell["metadata"].get("tags", []) or src.lstrip().startswith("%"):
        continue
    exec(compile(src, "challenge.ipynb", "exec"), namespace)
    if len(sys.argv) > 2 and sys.argv[2] in src:
        break
print("FINISHED")
"""
LOOP = "else train_backbone(name, out)"  # the loop over backbones: the driver stops after it

OPTIONS = {"img_size": 64, "workers": 0, "progress": False}
NOTEBOOK_ENV = {
    "COCO_BACKBONES": "efficientnet_lite0",
    "COCO_BATCH_SIZE": "16",
    "COCO_EPOCHS_FROZEN": "3",
    "COCO_EPOCHS_FINETUNE": "4",
    "COCO_LR_FINETUNE": "1e-3",
    "COCO_VAL_FRACTION": "0.25",
    "COCO_OPTIONS": json.dumps(OPTIONS),
}


def _driver(tmp_path, demo_root, run_dir, until=LOOP, **env):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COCO_")}
    env = {
        **clean,
        **NOTEBOOK_ENV,
        "COCO_DATA_ROOT": str(demo_root),
        "COCO_RUN_DIR": str(run_dir),
        **env,
    }
    return dict(args=[sys.executable, str(script), str(ROOT), *([until] if until else [])], env=env)


def _options(**change):
    return json.dumps({**OPTIONS, **change})


def _check_tensorboard(folder, phase, n):
    """Read the event files back with TensorBoard's own reader: every promised scalar is there."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(folder))
    mux.Reload()
    tags = {run: set(t["scalars"]) for run, t in mux.Runs().items()}
    plain = tags["."]
    for tag in (
        "train_loss",
        "val_loss",
        "val_course_f1",
        "val_precision",
        "val_recall",
        "val_mAP",
    ):
        assert len(mux.Scalars(".", f"{phase}/{tag}")) == n, (phase, tag)
    assert all(str(v).startswith(f"{phase}/") for v in plain)
    course = {run for run in tags if run != "."}  # the course's add_scalars: a sub-run per line
    for name in (
        "Losses_Train Loss vs Test Loss_Train Loss",
        "Metrics_Train F1 vs Test F1_Test F1",
        "Metrics_Train Precision vs Test Precision_Test Precision",
        "Metrics_Train Recall vs Test Recall_Test Recall",
    ):
        assert name in course, (name, course)


def test_killed_run_resumes_to_the_same_result(tmp_path, demo_root):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    out = subprocess.run(
        **_driver(tmp_path, demo_root, ref_dir), capture_output=True, text=True, timeout=600
    )
    assert "FINISHED" in out.stdout, out.stderr[-2000:]
    board = ref_dir / "tensorboard"  # one folder per frozen head, one for fine-tuning
    _check_tensorboard(board / "efficientnet_lite0_mlp", "frozen_mlp", 3)
    _check_tensorboard(board / "efficientnet_lite0_linear", "frozen_linear", 3)
    _check_tensorboard(board / "efficientnet_lite0", "finetune", 4)

    proc = subprocess.Popen(
        **_driver(tmp_path, demo_root, run_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpt = run_dir / "models/efficientnet_lite0/finetune_last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)  # mid fine-tuning, after >= 1 epoch
    proc.wait()
    assert not (run_dir / "models/efficientnet_lite0/result.json").exists()
    assert files.load_torch(ckpt)["epoch"] < 3  # not finished when killed
    assert (run_dir / files.LOCK_NAME).exists()  # the killed run's hold: stale now

    out = subprocess.run(
        **_driver(tmp_path, demo_root, run_dir), capture_output=True, text=True, timeout=600
    )
    assert "FINISHED" in out.stdout, out.stderr[-2000:]
    assert "resuming after epoch" in out.stdout
    assert f"note: took over {run_dir} from " in out.stdout  # its lock; released at exit
    assert not (run_dir / files.LOCK_NAME).exists()
    a = np.load(ref_dir / "models/efficientnet_lite0/val_scores.npz")
    b = np.load(run_dir / "models/efficientnet_lite0/val_scores.npz")
    np.testing.assert_allclose(a["probs_tta"], b["probs_tta"], atol=1e-5)
    ha = json.loads((ref_dir / "models/efficientnet_lite0/history.json").read_text())
    hb = json.loads((run_dir / "models/efficientnet_lite0/history.json").read_text())
    assert [r["val_loss"] for r in ha] == pytest.approx([r["val_loss"] for r in hb], abs=1e-5)
    # a finished backbone is not trained again
    out = subprocess.run(
        **_driver(tmp_path, demo_root, run_dir), capture_output=True, text=True, timeout=600
    )
    assert "efficientnet_lite0 (trained earlier in this run folder)" in out.stdout


def test_an_idle_challenge_kernel_holds_nothing_and_a_writing_cell_holds_the_folder(
    tmp_path, demo_root
):
    """A real kernel runs challenge.ipynb's cells up to its split, then idles: the analysis's
    note (files.held_note) says nothing. While a cell that writes results runs (here one that
    takes the hold, as each writing cell does, and waits), the note names the kernel and a
    second run stops; when the cell ends, the folder is free again."""
    from jupyter_client import KernelManager

    run_dir, go = tmp_path / "run", tmp_path / "go"
    env = {**_driver(tmp_path, demo_root, run_dir)["env"], "IPYTHONDIR": str(tmp_path / "ipy")}
    cells = []
    for cell in json.loads((ROOT / "challenge.ipynb").read_text())["cells"]:
        if cell["cell_type"] == "code" and "nbval-skip" not in cell["metadata"].get("tags", []):
            cells.append("".join(cell["source"]))
        if "load_or_make_split(" in "".join(cell["source"]):
            break
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(ROOT), env=env)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        for source in cells:
            reply = kc.execute_interactive(source, timeout=300, output_hook=lambda msg: None)
            assert reply["content"]["status"] == "ok", (source[:80], reply["content"])
        assert (run_dir / "split.json").exists()
        assert files.held_note(run_dir) is None and not (run_dir / files.LOCK_NAME).exists()
        waiting = (f"files.hold_run_folder(run_dir)\nwhile not Path({str(go)!r}).exists():\n"
                   "    time.sleep(0.05)")  # fmt: skip
        msg_id = kc.execute(waiting)
        deadline = time.time() + 60
        while not (run_dir / files.LOCK_NAME).exists() and time.time() < deadline:
            time.sleep(0.05)
        note = files.held_note(run_dir)
        assert note and "a training run still works" in note and "a notebook's kernel" in note
        with pytest.raises(files.RunFolderBusy):
            files.hold_run_folder(run_dir)
        go.touch()
        while kc.get_shell_msg(timeout=60)["parent_header"].get("msg_id") != msg_id:
            pass
        assert files.held_note(run_dir) is None and not (run_dir / files.LOCK_NAME).exists()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_notebook_stops_before_training_on_changed_settings(tmp_path, demo_root):
    """The notebook's own cells: a changed training setting stops the run with the list of
    differences and leaves config.json as it was; a changed after-training setting reuses."""
    run_dir = tmp_path / "run"

    def run(**env):
        d = _driver(
            tmp_path, demo_root, run_dir, COCO_EPOCHS_FROZEN="1", COCO_EPOCHS_FINETUNE="0", **env
        )
        return subprocess.run(**d, capture_output=True, text=True, timeout=600)

    out = run()
    assert "FINISHED" in out.stdout, out.stderr[-2000:]
    config_before = (run_dir / "config.json").read_text()
    out = run(COCO_LR_HEAD="0.01")
    assert "FINISHED" not in out.stdout and "StaleRunError" in out.stderr
    assert "lr_head: 0.001 -> 0.01" in out.stderr and '"retrain"' in out.stderr
    assert (run_dir / "config.json").read_text() == config_before
    out = run(COCO_OPTIONS=_options(shrink=3))  # a choice after training: nothing retrained
    assert "efficientnet_lite0 (trained earlier in this run folder)" in out.stdout, out.stderr[
        -2000:
    ]
    assert json.loads((run_dir / "config.json").read_text())["shrink"] == 3
    out = run(COCO_LR_HEAD="0.01", COCO_OPTIONS=_options(retrain=["efficientnet_lite0"]))
    assert "FINISHED" in out.stdout and "moved aside" in out.stdout, out.stderr[-2000:]


def test_cpu_recipe_fits_once_and_thresholds_from_out_of_fold_scores(
    tmp_path, demo_root, monkeypatch
):
    """The offline CPU recipe on demo data: one fit per feature set (a backbone at two sizes),
    out-of-fold scores of every training image saved and used for the thresholds, the
    ensemble submitted without a pick, the expected test F1 printed, and reuse."""
    import cpu_recipe

    run_dir = tmp_path / "run"
    members = [("efficientnet_lite0", 0), ("efficientnet_lite0", 96)]
    lines = []
    summary = cpu_recipe.run(
        demo_root, run_dir, members=members, val_fraction=0.2, log=lines.append
    )
    folder = run_dir / "models/efficientnet_lite0"
    oof = np.load(folder / "train_oof.npz")
    split = json.loads((run_dir / "split.json").read_text())
    assert oof["probs"].shape == (len(split["train"]), 80) == oof["targets"].shape
    small = json.loads((run_dir / "models/efficientnet_lite0_96px/result.json").read_text())
    assert small["img_size"] == 96 and small["backbone"] == "efficientnet_lite0"
    saved = json.loads((run_dir / "thresholds.json").read_text())["ensemble"]
    assert saved["source"] == "out-of-fold training scores"
    table = pd.read_csv(run_dir / "results.csv", index_col=0)
    assert "course F1, out-of-fold thresholds" in table and summary["chosen"] == "ensemble"
    estimate = summary["expected_course_f1"]
    assert estimate["p10"] <= estimate["expected"] <= estimate["p90"]
    assert any("expected course F1 on" in line for line in lines)
    sub = json.loads((run_dir / "submission.json").read_text())
    submission.validate_submission(sub, demo_root / "images/test-resized")
    lines = []
    cpu_recipe.run(demo_root, run_dir, members=members, val_fraction=0.2, log=lines.append)
    assert sum("reused" in line for line in lines) == 2
    # the analysis finds each head at its size: where the fitted head looks, not a fresh one's
    from cocochallenge import analysis

    run = analysis.RunArtifacts(run_dir)
    images, maps = analysis.cams_for(run, "efficientnet_lite0_96px", [(0, 0, "FP")])
    assert images[0].size == (96, 96) and maps.shape[0] == 1
    import run as run_py  # and the whole analysis notebook reads the recipe's run folder

    for key in [k for k in os.environ if k.startswith("COCO_") and k != "COCO_HEADLESS"]:
        monkeypatch.delenv(key)  # nbval's settings, which the kernel would take over RUN_DIR

    run_py.execute(ROOT / "analysis.ipynb", run_dir / "analysis.ipynb", {"RUN_DIR": str(run_dir)},
                   quiet=True)  # fmt: skip
    (run_dir / "models/efficientnet_lite0_96px/frozen_best.pt").unlink()
    with pytest.raises(FileNotFoundError, match="kept no model"):
        analysis.cams_for(run, "efficientnet_lite0_96px", [(0, 0, "FP")])
