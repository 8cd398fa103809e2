"""A run folder never mixes settings: each stale artifact is found before any training."""

import json
import os
import stat

import numpy as np
import pytest
import torch

import cpu_recipe
import run
from cocochallenge import demo, files, metrics, runs, split, training

pytestmark = pytest.mark.quick

CFG = {
    "img_size": 64,
    "pad": True,
    "dropout": 0.2,
    "loss": "bce",
    "lr_head": 1e-3,
    "lr_finetune": 3e-4,
    "backbone_lr_factor": 0.1,
    "weight_decay": 1e-4,
    "epochs_frozen": 2,
    "epochs_finetune": 1,
    "batch_size": 16,
    "augment": "trivial",
    "freeze_bn": True,
    "ema_epochs": 1.0,
    "seed": 0,
    "tta": True,
    "at_least_one": True,
    "refit": False,
}
PRE = {"size": 64, "mean": (0.5,) * 3, "std": (0.5,) * 3}


def _settings(**change):
    return runs.model_settings("efficientnet_lite0", {**CFG, **change}, PRE, "data1", "split1")


def _trained(run_dir, finished=True, **change):
    """A backbone folder as the notebook leaves it (settings, a checkpoint, maybe result.json)."""
    folder = run_dir / "models" / "efficientnet_lite0"
    folder.mkdir(parents=True)
    files.save_json(_settings(**change), folder / "settings.json")
    torch.save({"epoch": 0}, folder / "frozen_last.pt")
    if finished:
        files.save_json({"name": "efficientnet_lite0"}, folder / "result.json")
    return folder


def test_finished_backbone_with_other_settings_stops_the_run(tmp_path):
    _trained(tmp_path, epochs_finetune=1)
    with pytest.raises(files.StaleRunError) as err:
        runs.check_model(tmp_path, _settings(epochs_finetune=2))
    msg = str(err.value)
    assert "epochs_finetune: 1 -> 2" in msg and "RUN_DIR" in msg
    assert 'OPTIONS = {"retrain": ["efficientnet_lite0"]}' in msg
    assert (tmp_path / "models/efficientnet_lite0/result.json").exists()  # nothing touched


@pytest.mark.parametrize(
    "change",
    [
        {"lr_finetune": 1e-4},
        {"img_size": 96},
        {"loss": "asl"},
        {"pad": False},
        {"augment": "none"},
        {"ema_epochs": 0.0},
    ],
)
def test_half_trained_backbone_is_not_resumed_with_other_settings(tmp_path, change):
    _trained(tmp_path, finished=False)
    with pytest.raises(files.StaleRunError, match=next(iter(change))):
        runs.check_model(tmp_path, _settings(**change))


def test_new_data_or_split_makes_every_model_stale(tmp_path):
    _trained(tmp_path)
    new = {**_settings(), "data": "data2", "split": "split2"}
    with pytest.raises(files.StaleRunError, match="data: 'data1' -> 'data2'"):
        runs.check_model(tmp_path, new)


def test_same_settings_reuse_and_resume(tmp_path):
    _trained(tmp_path, finished=False)
    assert runs.check_model(tmp_path, _settings()) == "resume"
    files.save_json({}, tmp_path / "models/efficientnet_lite0/result.json")
    assert runs.check_model(tmp_path, _settings()) == "done"
    assert runs.check_model(tmp_path / "other", _settings()) == "new"


def test_retrain_switch_moves_old_files_aside_not_away(tmp_path):
    folder = _trained(tmp_path)
    (tmp_path / "tensorboard/efficientnet_lite0").mkdir(parents=True)  # the old curves go too
    lines = []
    status = runs.check_model(tmp_path, _settings(lr_head=1e-2), retrain=True, log=lines.append)
    assert status == "retrain" and not folder.exists()
    kept = list((tmp_path / "replaced").glob("*/models/efficientnet_lite0/result.json"))
    assert len(kept) == 1 and any("moved aside" in line for line in lines)
    assert not (tmp_path / "tensorboard/efficientnet_lite0").exists()


def test_retrain_does_nothing_to_a_model_of_these_settings(tmp_path):
    """Left in the parameters, `retrain` would train finished models again at every run."""
    folder = _trained(tmp_path, finished=False)
    assert runs.check_model(tmp_path, _settings(), retrain=True) == "resume"
    assert (folder / "frozen_last.pt").exists() and not (tmp_path / "replaced").exists()


def test_a_folder_with_no_trained_epoch_is_made_again_without_asking(tmp_path):
    """A failed try left settings.json and a feature cache, no checkpoint: other settings start
    it again, said in one line; nothing is kept aside."""
    folder = tmp_path / "models" / "efficientnet_lite0"
    files.save_json(_settings(img_size=96), folder / "settings.json")
    torch.save({"key": {}, "feats": torch.zeros(2, 3)}, folder / "features_train.pt")
    (tmp_path / "tensorboard/efficientnet_lite0").mkdir(parents=True)
    lines = []
    assert runs.check_model(tmp_path, _settings(), log=lines.append) == "new"
    assert not folder.exists() and not (tmp_path / "tensorboard/efficientnet_lite0").exists()
    assert (
        len(lines) == 1 and "no epoch was trained" in lines[0] and "img_size: 96 -> 64" in lines[0]
    )
    assert not (tmp_path / "replaced").exists()


def _try(run_dir, demo_root, val_fraction, retrain=(), log=None, **change):
    """One try of challenge.ipynb up to its training loop, as its cells call the library: the
    split, the digests, the check of every backbone (status, settings)."""
    import helpers as h
    from cocochallenge import data

    paths = data.data_paths(demo_root)
    train_set = h.COCOTrainImageDataset(paths["train_images"], paths["train_labels"])
    test_set = h.COCOTestImageDataset(paths["test_images"])
    Y = data.labels_of(train_set)
    cfg = {**CFG, "run_dir": str(run_dir), "retrain": list(retrain), "frozen_only": [], **change}
    log = log if log is not None else print
    inventory = data.inventory(train_set, Y)
    split.load_or_make_split(data.stems(train_set), Y, run_dir / "split.json", val_fraction, 0,
                             inventory, replace="all" in cfg["retrain"], log=log)  # fmt: skip
    ids = runs.run_ids(run_dir, inventory, test_set)
    return runs.check_models(run_dir, ["efficientnet_lite0"], cfg, ids, log=log)[0]


def test_a_failed_try_never_blocks_the_next_and_retrain_applies_once(tmp_path, demo_root):
    run_dir = tmp_path / "run"
    lite0 = run_dir / "models" / "efficientnet_lite0"
    # 1st try: stops after the split (a network whose weights cannot be had)
    split.load_or_make_split([f"{i}" for i in range(40)], np.eye(80)[np.arange(40) % 4],
                             run_dir / "split.json", 0.5, 0)  # fmt: skip
    # 2nd try: stops in its first epoch, after the check wrote settings.json and a feature cache
    assert _try(run_dir, demo_root, 0.2) == {"efficientnet_lite0": "new"}
    torch.save({"key": {}, "feats": torch.zeros(2, 3)}, lite0 / "features_train.pt")
    # 3rd try, other settings and another VAL_FRACTION, no retrain: it trains
    lines = []
    status = _try(run_dir, demo_root, 0.25, log=lines.append, img_size=96, epochs_finetune=3)
    assert status == {"efficientnet_lite0": "new"}, lines
    assert any(line.startswith("split.json: made again") for line in lines)
    assert any("no epoch was trained with its old settings" in line for line in lines)
    saved = json.loads((lite0 / "settings.json").read_text())
    split_id = json.loads((run_dir / "split.json").read_text())["id"]
    assert saved["img_size"] == 96 and saved["split"] == split_id
    assert not (lite0 / "features_train.pt").exists()
    torch.save({"epoch": 0}, lite0 / "frozen_last.pt")  # it trained an epoch
    # 4th try: a model trained on this split: another VAL_FRACTION would mix results, and stops
    with pytest.raises(files.StaleRunError, match="efficientnet_lite0 trained on"):
        _try(run_dir, demo_root, 0.3, img_size=96, epochs_finetune=3)
    assert json.loads((run_dir / "split.json").read_text())["id"] == split_id
    # ... unless retrain says so, for this run
    status = _try(run_dir, demo_root, 0.3, ["all"], img_size=96, epochs_finetune=3)
    assert status == {"efficientnet_lite0": "retrain"} and not (lite0 / "frozen_last.pt").exists()
    torch.save({"epoch": 0}, lite0 / "frozen_last.pt")
    # 5th try, retrain left in: nothing is moved aside again, and the run says to remove it
    lines = []
    status = _try(run_dir, demo_root, 0.3, ["all"], log=lines.append, img_size=96,
                  epochs_finetune=3)  # fmt: skip
    assert status == {"efficientnet_lite0": "resume"} and (lite0 / "frozen_last.pt").exists()
    assert [line for line in lines if "remove it from OPTIONS" in line], lines
    assert len(list((run_dir / "replaced").iterdir())) == 1


def test_after_training_settings_are_not_training_settings():
    for key in (
        "tta",
        "at_least_one",
        "shrink",
        "backbones",
        "progress",
        "workers",
        "device",
        "refit",
    ):
        assert key not in runs.TRAINING_SETTINGS
    same = runs.model_settings("x", CFG, PRE, "d", "s")
    assert runs.model_settings("x", {**CFG, "tta": False, "refit": True}, PRE, "d", "s") == same


class _Backbone(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :4]


def test_feature_cache_is_keyed_not_counted(tmp_path):
    ds = torch.utils.data.TensorDataset(torch.rand(6, 1, 2, 2), torch.zeros(6, 80))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    key = {"backbone": "b", "size": 64, "pad": True, "mean": [0.5] * 3, "images": "split1"}
    path = tmp_path / "features_train.pt"
    f1 = training.cached_features(path, _Backbone(), loader, "cpu", key=key, show_progress=False)
    f2 = training.cached_features(path, _Backbone(), loader, "cpu", key=key, show_progress=False)
    assert torch.equal(f1, f2)
    torch.save({"epoch": 0}, tmp_path / "frozen_last.pt")  # a model was trained on them
    for change in ({"images": "split2"}, {"size": 96}, {"pad": False}, {"mean": [0.4] * 3}):
        with pytest.raises(
            files.StaleRunError, match=next(iter(change))
        ):  # same row count, other key
            training.cached_features(
                path, _Backbone(), loader, "cpu", key={**key, **change}, show_progress=False
            )
    assert torch.equal(training.load_features(path), f1)  # untouched by the refusals
    (tmp_path / "frozen_last.pt").unlink()  # a failed try's cache: computed again, said once
    lines = []
    new = {**key, "images": "split2"}
    training.cached_features(path, _Backbone(), loader, "cpu", key=new, log=lines.append,
                             show_progress=False)  # fmt: skip
    assert files.load_torch(path)["key"]["images"] == "split2"
    assert len(lines) == 1 and "computed again (images: 'split1' -> 'split2')" in lines[0]


def test_ensemble_refuses_models_validated_on_other_images(tmp_path):
    y = np.zeros((4, 80), np.uint8)
    y[:, 0] = 1
    for name, stems in (("a", ["1", "2", "3", "4"]), ("b", ["1", "2", "3", "5"])):
        folder = tmp_path / "models" / name
        p = np.full((4, 80), 0.3, np.float32)
        files.save_npz(
            folder / "val_scores.npz", probs=p, probs_tta=p, targets=y, stems=np.array(stems)
        )
        files.save_npz(folder / "test_scores.npz", probs=p, probs_tta=p, stems=np.array(stems))
        files.save_json({"train_seconds": 1, "parameters": 1}, folder / "result.json")
    scores = {n: runs.load_scores(tmp_path, n) for n in ("a", "b")}
    with pytest.raises(files.StaleRunError, match="different images"):
        runs.same_images(scores)
    runs.same_images({"a": scores["a"], "again": scores["a"]})  # the same images: no error


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_mode_a_normal_write_gives(tmp_path, umask):
    """The umask decides, as for any file the user writes (a hard-coded 0644 fails 077, 002)."""
    old = os.umask(umask)
    try:
        path = files.save_json({"a": 1}, tmp_path / "x.json")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o666 & ~umask


def test_demo_generator_never_deletes_files_it_did_not_write(tmp_path):
    root = tmp_path / "ms-coco"
    real = root / "images" / "train-resized" / "000000000139.jpg"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"a real photo")
    with pytest.raises(ValueError, match="refusing"):
        demo.make_demo_data(root, n_train=5, n_test=2, progress=False)
    assert real.read_bytes() == b"a real photo"


def test_demo_data_a_run_used_is_not_replaced_by_another_size(tmp_path):
    root = tmp_path / "demo"
    demo.make_demo_data(root, n_train=12, n_test=3, progress=False)
    with pytest.raises(ValueError, match="another demo folder"):
        demo.make_demo_data(root, n_train=6, n_test=3, progress=False, replace=False)
    assert len(list((root / "labels/train").glob("*.cls"))) == 12
    demo.make_demo_data(
        root, n_train=12, n_test=3, progress=False, replace=False
    )  # same set: reused


def test_smoke_mode_has_its_own_folders():
    """run.py --smoke never writes into a real run's folder nor regenerates its demo data."""
    args = run.main.__globals__["argparse"].Namespace
    smoke = run.parameters_of(
        args(smoke=True, data_root=None, backbones=None, parameter=[], run_dir=None)
    )
    assert smoke["RUN_DIR"].endswith("runs/smoke") and smoke["DATA_ROOT"] == "demo"
    assert smoke["OPTIONS"]["demo_dir"] == "data/smoke/ms-coco" and smoke["EPOCHS_FROZEN"] == 2
    demo_run = run.parameters_of(
        args(smoke=False, data_root=None, backbones=None, parameter=[], run_dir=None)
    )
    assert demo_run["RUN_DIR"].endswith("runs/demo") and "demo_dir" not in demo_run["OPTIONS"]


def test_threshold_between_adjacent_float32_scores_keeps_the_positive():
    hi = np.float32(0.3)
    lo = np.nextafter(hi, np.float32(0))  # the float32 just below
    probs = np.zeros((8, 80), np.float32)
    y = np.zeros((8, 80), np.uint8)
    probs[:, 0] = [hi, lo, lo, lo, 0.1, 0.1, 0.1, 0.1]
    y[:, 0] = [1, 0, 0, 0, 0, 0, 0, 0]
    y[:5, 1] = 1
    t = metrics.per_class_thresholds(y, probs, min_positives=1)
    pred = metrics.apply_thresholds(probs, t)
    assert pred[0, 0] and not pred[1:, 0].any()


def test_repair_split_guarantees_both_sides_or_reports():
    rng = np.random.default_rng(1)
    Y = (rng.random((60, 30)) < 0.06).astype(bool)
    Y[:2, 29], Y[2:, 29] = True, False  # a class of exactly two images
    side = np.zeros(60, np.int8)
    side[:5] = 1  # a split that misses many classes
    left = split.repair_split(Y, side)
    both = (Y[side == 0].sum(0) > 0) & (Y[side == 1].sum(0) > 0)
    assert left == sorted(np.flatnonzero(~both & (Y.sum(0) >= 2)).tolist())
    assert both[Y.sum(0) >= 2].all() and left == []
    stuck = np.zeros(60, np.int8)
    assert split.repair_split(Y, stuck, max_passes=0) != []  # nothing moved: reported, not hidden


def test_logistic_head_folds_the_standardisation_and_oof_never_sees_its_rows():
    torch.manual_seed(0)
    x = torch.randn(300, 64) * 5 + 3  # unscaled features: z-scoring matters
    w = torch.randn(64, 80) * 0.3
    y = (torch.sigmoid((x - 3) / 5 @ w - 2) > torch.rand(300, 80)).numpy().astype(np.uint8)
    layer = cpu_recipe.fit_logistic(x[:200], y[:200], C=0.1)
    assert isinstance(layer, torch.nn.Linear) and layer.weight.shape == (80, 64)
    with torch.no_grad():
        p = torch.sigmoid(layer(x[200:])).numpy()
    assert metrics.mean_average_precision(y[200:], p) > 0.5
    oof = cpu_recipe.out_of_fold_probs(x[:200], y[:200], C=0.1, folds=4, seed=0)
    with torch.no_grad():
        in_sample = torch.sigmoid(layer(x[:200])).numpy()
    # scores of rows the fit never saw are worse than in-sample ones: they are out of fold
    assert metrics.mean_average_precision(y[:200], oof) < metrics.mean_average_precision(
        y[:200], in_sample
    )
    t = metrics.shrunk_thresholds(y[:200], oof, k=10)
    g = metrics.best_global_threshold(y[:200], oof)[0]
    raw = metrics.per_class_thresholds(y[:200], oof, min_positives=1, fallback=g)
    n = y[:200].sum(0)
    assert np.allclose(t, (n * raw + 10 * g) / (n + 10))
    assert (np.abs(t - g) <= np.abs(raw - g) + 1e-12).all()  # never further from the global one


def test_the_notebook_and_the_cpu_recipe_choose_the_same_thresholds():
    """One rule: challenge.ipynb's `thresholds_for` (section 9, run from the notebook's own cell)
    and cpu_recipe.py's give the same thresholds on the same scores."""
    import cpu_recipe

    cell = next(c for c in _notebook_cells("challenge.ipynb") if "def thresholds_for(" in c)
    cell = cell[: cell.index("files.hold_run_folder")]  # the rule, not what the run saves
    rng = np.random.default_rng(0)
    y = (rng.random((150, 80)) < 0.08).astype(np.uint8)
    p = np.clip(y * 0.5 + rng.random((150, 80)) * 0.5, 0, 1)
    namespace = {"metrics": metrics, "cfg": {"shrink": 7}}
    exec(compile(cell, "challenge.ipynb", "exec"), namespace)
    best, recipe = cpu_recipe.thresholds_for(y, p, shrink=7)
    t, per_class = namespace["thresholds_for"](y, p)
    np.testing.assert_array_equal(per_class, recipe)
    assert best == t == metrics.best_global_threshold(y, p)[0]
    assert not np.allclose(recipe, cpu_recipe.thresholds_for(y, p, shrink=1)[1])  # shrink acts


def _notebook_cells(name):
    from pathlib import Path

    nb = json.loads((Path(__file__).resolve().parents[1] / name).read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_equal_f1_cuts_keep_the_highest_threshold():
    """Among cuts with the same F1 the highest wins (fewest predictions), compared on counts:
    here F1 = 6/9 after 0.494 and 8/12 after 0.161, which 2PR/(P+R) rounds apart."""
    scores = [0.717, 0.383, 0.161, 0.606, 0.05, 0.494, 0.828, 0.272, 0.939]
    labels = [1, 0, 1, 0, 0, 1, 1, 0, 0]
    probs = np.zeros((9, 80))
    y = np.zeros((9, 80), np.uint8)
    probs[:, 0], y[:, 0] = scores, labels
    t = metrics.per_class_thresholds(y, probs, min_positives=1)
    assert t[0] == pytest.approx((0.494 + 0.383) / 2)


def test_a_split_made_again_by_another_kernel_between_two_cells_stops_the_check(
    tmp_path, demo_root
):
    """The lock lasts a cell: a second kernel may make the split again while the first sits
    between its split cell and its check before training; the first then stops, in words."""
    import helpers as h
    from cocochallenge import data

    paths = data.data_paths(demo_root)
    train_set = h.COCOTrainImageDataset(paths["train_images"], paths["train_labels"])
    test_set = h.COCOTestImageDataset(paths["test_images"])
    Y = data.labels_of(train_set)
    inventory, run_dir = data.inventory(train_set, Y), tmp_path / "run"
    split.load_or_make_split(data.stems(train_set), Y, run_dir / "split.json", 0.2, 0, inventory)
    ids = runs.run_ids(run_dir, inventory, test_set)  # the first kernel's split cell
    split.load_or_make_split(data.stems(train_set), Y, run_dir / "split.json", 0.3, 0, inventory)
    cfg = {**CFG, "run_dir": str(run_dir), "retrain": [], "frozen_only": []}
    with pytest.raises(files.StaleRunError, match="changed since this notebook read it"):
        runs.check_models(run_dir, ["efficientnet_lite0"], cfg, ids)
    assert not (run_dir / "models").exists()
