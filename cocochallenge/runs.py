"""The run folder: what one run of the challenge notebook writes, checked before training.

Layout (both notebooks and the tests agree on it)::

    <run>/config.json, environment.json, split.json, summary.json, results.csv, thresholds.json
    <run>/models/<backbone>/frozen_{last,best}.pt, finetune_{last,best}.pt, features_*.pt,
                             history.json, val_scores.npz, test_scores.npz, result.json
    <run>/models/<backbone>/seed<k>/frozen_{last,best}.pt      the frozen head with other seeds
    <run>/course_recipe/<backbone>/val_scores.npz, result.json   the course's recipe, per network
    <run>/tensorboard/<backbone>/, <run>/figures/*.png, <run>/submission.json
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .checkpoints import PhaseCheckpoint
from .config import environment_report
from .files import (
    StaleRunError,
    differences,
    hold_run_folder,
    load_json,
    load_npz,
    save_json,
    save_npz,
    stale_message,
    trained,
)
from .training import predict


def prepare_run_dir(cfg: dict) -> Path:
    """Create the run folder and record the config and the environment, for traceability."""
    run_dir = Path(cfg["run_dir"]).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(cfg, run_dir / "config.json")
    save_json(environment_report(), run_dir / "environment.json")
    return run_dir


def run_ids(run_dir: Path | str, inventory: dict, test_set) -> dict:
    """The digests a trained model depends on: the labelled data (``data.inventory``), the
    split (``split.json``) and the test images; compared with the run folder's before training."""
    from .data import digest, test_digest

    split = load_json(Path(run_dir) / "split.json")["id"]
    return {"data": digest(inventory), "split": split, "test": test_digest(test_set)}


def find_answers(data_root: Path | str) -> Path | None:
    """``test_labels.json`` beside or inside the data root (demo data and the real-photo set)."""
    for cand in (Path(data_root) / "test_labels.json", Path(data_root).parent / "test_labels.json"):
        if cand.exists():
            return cand
    return None


def save_model_scores(model, out: Path | str, loaders: dict, result: dict, history: list,
                      ids: dict, device, **kwargs) -> dict:  # fmt: skip
    """Validation and test probabilities of the kept model (plain and flip-TTA), then result.json.

    These files are what thresholds, the ensemble, the analysis and the submission are made
    from. Both kinds of scores are always saved, so turning TTA on or off later needs no
    retraining. ``result.json`` is written last: its presence marks the backbone as finished.
    """
    import time

    out = Path(out)
    t0 = time.perf_counter()
    val = predict(model, loaders["val"], device, tta_flip=True, desc="val (TTA)", **kwargs)
    val_seconds = time.perf_counter() - t0
    save_test_scores(model, out, loaders["test"], ids["test"], device, **kwargs)
    save_npz(
        out / "val_scores.npz",
        probs=val["probs"],
        probs_tta=val["probs_tta"],
        targets=val["targets"],
        stems=np.array(loaders["val"].dataset.stems),
    )
    save_json(history, out / "history.json")
    result = {**result, "parameters": sum(p.numel() for p in model.parameters()),
              "val_images_per_second": len(val["probs"]) / max(val_seconds, 1e-9)}  # fmt: skip
    save_json(result, out / "result.json")
    return result


def save_test_scores(model, out: Path | str, test_loader, test_id: str, device, **kwargs) -> None:
    """The test images' probabilities (plain and flip-TTA) as ``<out>/test_scores.npz``, with the
    digest of the test folder they were computed on (``data.test_digest``)."""
    test = predict(model, test_loader, device, tta_flip=True, desc="test (TTA)", **kwargs)
    save_npz(Path(out) / "test_scores.npz", probs=test["probs"], probs_tta=test["probs_tta"],
             stems=np.array(test["stems"]), data=np.array(test_id))  # fmt: skip


def test_scores_stale(out: Path | str, test_id: str) -> bool:
    """Whether ``<out>/test_scores.npz`` is missing or was computed on another test folder."""
    path = Path(out) / "test_scores.npz"
    if not path.exists():
        return True
    scores = load_npz(path)  # a damaged file is named, with what to do
    return "data" not in scores or str(scores["data"]) != test_id


def head_folder(out: Path | str, kind: str = "mlp") -> Path:
    """Where a backbone's phase-1 head of ``kind`` keeps its checkpoints: the course's MLP head
    in the backbone's folder itself, another head in a folder of its name (``linear/``)."""
    return Path(out) if kind in ("mlp", "logistic") else Path(out) / kind


def load_kept_model(run_dir: Path | str, name: str, model):
    """Put the weights a finished backbone kept into ``model`` (a fresh build of it): the whole
    network after fine-tuning (raw weights or their average), else the best frozen head; the
    head is made anew of the kind the run kept (``result.json``)."""
    from .models import set_head

    out = Path(run_dir) / "models" / name
    result = load_json(out / "result.json")
    kind = result.get("head", "mlp")
    set_head(model, kind)
    finetuned = result["best_phase"].startswith("finetune")
    folder = out if finetuned else head_folder(out, kind)
    kept = PhaseCheckpoint(folder, "finetune" if finetuned else "frozen", {})
    if not kept.best_path.exists():  # a fresh head would give a plausible-looking wrong answer
        raise FileNotFoundError(f"{name} kept no model in this run folder ({kept.best_path})")
    kept.load_best(model if finetuned else model.head)
    return model


def views(scores: dict, names: list[str]) -> dict:
    """``{model: {"plain": probabilities, "flip TTA": probabilities}}`` of each network's saved
    ``scores`` (:func:`load_scores`) and, for two or more, of their ensemble: the mean of their
    probabilities, view by view."""
    out = {n: {"plain": scores[n]["probs"], "flip TTA": scores[n]["probs_tta"]} for n in names}
    if len(names) > 1:
        out["ensemble"] = {v: np.mean([out[n][v] for n in names], axis=0) for v in out[names[0]]}
    return out


#: Where the course's recipe, trained as a baseline on each network's frozen features by
#: challenge.ipynb, keeps its scores: ``<run>/course_recipe/<network>/``.
BASELINE = "course_recipe"


def save_baseline(run_dir: Path | str, name: str, results: dict, targets, epochs: int,
                  best_epoch: int) -> None:  # fmt: skip
    """The course recipe's validation scores on ``name``'s features, at its best epoch
    (``validation_loop`` with ``keep_probs``)."""
    out = Path(run_dir) / BASELINE / name
    save_npz(out / "val_scores.npz", probs=results["probs"], targets=np.asarray(targets))
    save_json({"course_f1": float(results["f1"]), "precision": float(results["precision"]),
               "recall": float(results["recall"]), "epochs": epochs, "best_epoch": best_epoch,
               "threshold": "raw output > 0.5"}, out / "result.json")  # fmt: skip


def load_scores(run_dir: Path | str, name: str, split: str = "val") -> dict:
    """Saved probabilities of one model: ``probs``, ``probs_tta``, ``stems`` (and ``targets``)."""
    return load_npz(Path(run_dir) / "models" / name / f"{split}_scores.npz")


def same_images(scores: dict) -> None:
    """Stop when the models were validated on different images: an ensemble, or a comparison,
    of scores of other images is meaningless (a backbone kept from an older split)."""
    names = list(scores)
    for name in names[1:]:
        if not np.array_equal(scores[name]["stems"], scores[names[0]]["stems"]):
            raise StaleRunError(
                f"{name} and {names[0]} were validated on different images: their scores "
                f'cannot be compared or averaged; set OPTIONS = {{"retrain": ["{name}"]}}'
            )


# ---- What determines each artifact, checked before any training -------------------------------
#: Settings that change what a backbone's training produces. Any difference makes its
#: checkpoints, features and scores stale. Everything else (thresholds, TTA, the top-1
#: guarantee, the ensemble, progress bars, workers) acts after training and reuses the models.
TRAINING_SETTINGS = (
    "img_size",
    "pad",
    "dropout",
    "loss",
    "lr_head",
    "lr_finetune",
    "backbone_lr_factor",
    "weight_decay",
    "epochs_frozen",
    "epochs_finetune",
    "batch_size",
    "augment",
    "freeze_bn",
    "ema_epochs",
    "seed",
)


def model_settings(
    name: str, cfg: dict, preprocess: dict, data_id: str, split_id: str, amp_dtype=None
) -> dict:
    """Everything that determines one backbone's trained model, as stored in ``settings.json``."""
    return {
        "backbone": name,
        **{k: cfg[k] for k in TRAINING_SETTINGS},
        # a frozen-only backbone is not fine-tuned: its model does not depend on those epochs
        "epochs_finetune": 0 if name in cfg.get("frozen_only", ()) else cfg["epochs_finetune"],
        "input": {
            "size": preprocess["size"],
            "mean": list(preprocess["mean"]),
            "std": list(preprocess["std"]),
        },
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
        "data": data_id,
        "split": split_id,
    }


def move_aside(run_dir: Path | str, *paths: Path | str, log=print) -> Path | None:
    """Move stale artifacts to ``<run>/replaced/<time>/`` (kept for inspection, out of the way)."""
    import shutil
    import time

    run_dir = Path(run_dir)
    paths = [Path(p) for p in paths if Path(p).exists()]
    if not paths:
        return None
    dest = run_dir / "replaced" / time.strftime("%Y%m%d-%H%M%S")
    for p in paths:
        target = dest / p.resolve().relative_to(run_dir.resolve())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(p), str(target))
        log(f"moved aside: {p} -> {target}")
    return dest


def check_models(run_dir: Path | str, names: list[str], cfg: dict, ids: dict, amp_dtype=None,
                 log=print) -> tuple[dict, dict]:  # fmt: skip
    """``(status, settings)`` of every backbone, checked before any training starts.

    ``ids`` holds the digests of the labelled data, the split and the test images. Each
    backbone's status is :func:`check_model`'s; ``settings`` is what its ``settings.json``
    records. Only when every backbone agrees with the folder is ``config.json`` written. The
    folder is held from here to the end of the cell (:func:`files.hold_run_folder`). The
    ``retrain`` option applies where it has something to replace; where it replaced nothing
    (the backbones were trained with these settings), the run says to remove it, every time.
    """
    from .models import preprocess_for

    hold_run_folder(run_dir, log)
    split_file = Path(run_dir) / "split.json"
    if "split" in ids and split_file.exists() and load_json(split_file)["id"] != ids["split"]:
        raise StaleRunError(  # another kernel made it again between this one's two cells
            f"{split_file} changed since this notebook read it (another run in this folder "
            "between two cells?): run the notebook again from the split cell."
        )
    asked = set(names) if "all" in cfg["retrain"] else set(cfg["retrain"])
    status, settings = {}, {}
    for name in names:
        pre = preprocess_for(name, cfg["img_size"])
        settings[name] = model_settings(name, cfg, pre, ids["data"], ids["split"], amp_dtype)
        status[name] = check_model(run_dir, settings[name], name in asked, log, ids["test"])
    unused = sorted(n for n in asked if status.get(n) != "retrain")
    if unused and ("all" not in cfg["retrain"] or "retrain" not in status.values()):
        models = Path(run_dir) / "models"
        log(f'note: OPTIONS "retrain" replaced nothing for {", ".join(unused)} (trained with '
            "these settings, or not in this folder): remove it from OPTIONS. To train one again "
            f"with the same settings, move its folder out of {models}.")  # fmt: skip
    for name in names:  # the folder of a backbone to train says with which settings
        if status[name] in ("new", "retrain"):
            save_json(settings[name], Path(run_dir) / "models" / name / "settings.json")
    prepare_run_dir(cfg)
    return status, settings


def rescore_test_images(run_dir: Path | str, name: str, model, loaders: dict, ids: dict, device,
                        **kwargs) -> None:  # fmt: skip
    """Only the test folder changed since ``name`` finished: its kept model scores the new test
    images; nothing is trained again."""
    kept = load_kept_model(run_dir, name, model)
    save_test_scores(kept, Path(run_dir) / "models" / name, loaders["test"], ids["test"], device,
                     **kwargs)  # fmt: skip
    print(f"{name}: the new test images scored by the kept model; nothing trained again")


def check_model(run_dir: Path | str, settings: dict, retrain: bool = False, log=print,
                test_id: str | None = None) -> str:  # fmt: skip
    """``new``, ``retrain``, ``resume``, ``done`` or ``new test images`` for one backbone.

    Its stored settings (training settings, input, the labelled data's digest, the split) are
    compared with ``settings``. Where they differ and no epoch was trained with the old ones
    (a failed try), the folder is emptied with a one-line note: ``new``. Where a trained model
    would be mixed with the new settings the run stops (:class:`StaleRunError`), unless
    ``retrain`` is set: then the old files are moved aside and the backbone starts again,
    ``retrain``. ``retrain`` does nothing to a backbone trained with these settings. A finished
    backbone whose test scores were computed on another test folder (``test_id``) only needs
    them again: ``new test images``. Run for every backbone before any training.
    """
    import shutil

    name = settings["backbone"]
    folder = Path(run_dir) / "models" / name
    path = folder / "settings.json"
    if not folder.exists() or not any(folder.iterdir()):
        return "new"
    old = load_json(path) if path.exists() else {"(settings.json)": "missing"}
    diffs = differences(old, settings)
    if not diffs:
        if not trained(folder):
            return "new"
        if not (folder / "result.json").exists():
            return "resume"
        stale = test_id is not None and test_scores_stale(folder, test_id)
        return "new test images" if stale else "done"
    board = Path(run_dir) / "tensorboard" / name  # its curves: of the old settings too
    if not trained(folder):
        shutil.rmtree(folder)
        shutil.rmtree(board, ignore_errors=True)
        log(f"{name}: no epoch was trained with its old settings ({'; '.join(diffs)}): its "
            "files are made again with these")  # fmt: skip
        return "new"
    if not retrain:
        switch = f'OPTIONS = {{"retrain": ["{name}"]}}'
        raise StaleRunError(stale_message(f"backbone {name}", diffs, Path(run_dir), switch))
    move_aside(run_dir, folder, board, log=log)
    return "retrain"
