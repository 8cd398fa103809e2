"""The run folder: what one run of the challenge notebook writes, and the model comparison.

Layout (both notebooks and the tests agree on it)::

    <run>/config.json, environment.json, split.json, summary.json, results.csv, thresholds.json
    <run>/models/<backbone>/frozen_{last,best}.pt, finetune_{last,best}.pt, features_*.pt,
                             history.json, val_scores.npz, test_scores.npz, result.json
    <run>/tensorboard/<backbone>/, <run>/figures/*.png, <run>/submission.json
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .checkpoints import PhaseCheckpoint
from .config import environment_report
from .files import (
    StaleRunError,
    atomic_path,
    differences,
    load_json,
    save_json,
    save_npz,
    stale_message,
)
from .metrics import evaluate_predictions, tune_thresholds
from .training import predict


def prepare_run_dir(cfg: dict) -> Path:
    """Create the run folder and record the config and the environment, for traceability."""
    run_dir = Path(cfg["run_dir"]).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(cfg, run_dir / "config.json")
    save_json(environment_report(), run_dir / "environment.json")
    return run_dir


def find_answers(data_root: Path | str) -> Path | None:
    """``test_labels.json`` beside or inside the data root (demo data and the real-photo set)."""
    for cand in (Path(data_root) / "test_labels.json", Path(data_root).parent / "test_labels.json"):
        if cand.exists():
            return cand
    return None


def save_model_scores(model, out: Path | str, val_loader, test_loader, device, result: dict,
                      history: list, test_id: str, **kwargs) -> dict:  # fmt: skip
    """Validation and test probabilities of the kept model (plain and flip-TTA), then result.json.

    These files are what thresholds, the ensemble, the analysis and the submission are made
    from. Both kinds of scores are always saved, so turning TTA on or off later needs no
    retraining. ``result.json`` is written last: its presence marks the backbone as finished.
    """
    import time

    out = Path(out)
    t0 = time.perf_counter()
    val = predict(model, val_loader, device, tta_flip=True, desc="val (TTA)", **kwargs)
    val_seconds = time.perf_counter() - t0
    save_test_scores(model, out, test_loader, device, test_id, **kwargs)
    save_npz(
        out / "val_scores.npz",
        probs=val["probs"],
        probs_tta=val["probs_tta"],
        targets=val["targets"],
        stems=np.array(val_loader.dataset.stems),
    )
    save_json(history, out / "history.json")
    result = {**result, "val_images_per_second": len(val["probs"]) / max(val_seconds, 1e-9)}
    save_json(result, out / "result.json")
    return result


def save_test_scores(model, out: Path | str, test_loader, device, test_id: str, **kwargs) -> None:
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
    with np.load(path) as z:
        return "data" not in z.files or str(z["data"]) != test_id


def load_kept_model(run_dir: Path | str, name: str, model):
    """Put the weights a finished backbone kept into ``model`` (a fresh build of it): the whole
    network after fine-tuning (raw weights or their average), else the best frozen head."""
    out = Path(run_dir) / "models" / name
    finetuned = load_json(out / "result.json")["best_phase"].startswith("finetune")
    kept = PhaseCheckpoint(out, "finetune" if finetuned else "frozen", {})
    if not kept.best_path.exists():  # a fresh head would give a plausible-looking wrong answer
        raise FileNotFoundError(f"{name} kept no model in this run folder ({kept.best_path})")
    kept.load_best(model if finetuned else model.head)
    return model


#: Where the course's recipe, trained as a baseline by challenge.ipynb, keeps its scores.
BASELINE = "course_recipe"


def save_baseline(run_dir: Path | str, results: dict, targets, steps: int, epochs: int) -> None:
    """The course recipe's validation scores (``validation_loop`` with ``keep_probs``)."""
    out = Path(run_dir) / BASELINE
    save_npz(out / "val_scores.npz", probs=results["probs"], targets=np.asarray(targets))
    save_json({"course_f1": float(results["f1"]), "precision": float(results["precision"]),
               "recall": float(results["recall"]), "steps": steps, "epochs": epochs,
               "threshold": "raw output > 0.5"}, out / "result.json")  # fmt: skip


def load_scores(run_dir: Path | str, name: str, split: str = "val") -> dict:
    """Saved probabilities of one model: ``probs``, ``probs_tta``, ``stems`` (and ``targets``)."""
    with np.load(Path(run_dir) / "models" / name / f"{split}_scores.npz") as z:
        return {k: z[k] for k in z.files}


def compare_models(
    run_dir: Path | str,
    names: list[str],
    tta: bool = True,
    at_least_one: bool = True,
    shrink: float = 10.0,
) -> tuple:
    """The results table (one row per model, plus the ensemble) and the tuned thresholds.

    The ensemble averages the models' probabilities and tunes its own thresholds. The rule is
    the same everywhere (:func:`~cocochallenge.metrics.tune_thresholds`): per class, shrunk
    toward the global threshold by ``shrink`` positives. It is tuned on the validation scores;
    when every model saved out-of-fold scores of its training images (``train_oof.npz``, the
    offline CPU recipe), on those instead, which leaves the whole validation split to score
    them (``f1_oof_thresholds``). ``f1_heldout`` (or ``f1_oof_halves``) is the rule tuned on
    random halves and scored on the other halves: it picks the submission. Returns
    ``(DataFrame, details)`` where ``details[name]`` holds the thresholds and the validation
    and test probabilities the table was computed from. Also writes ``results.csv`` and
    ``thresholds.json``.
    """
    import pandas as pd

    run_dir = Path(run_dir)
    key = "probs_tta" if tta else "probs"
    rows, details = [], {}
    for name in names:
        val, test = load_scores(run_dir, name, "val"), load_scores(run_dir, name, "test")
        res = load_json(run_dir / "models" / name / "result.json")
        details[name] = {
            "val": val[key],
            "test": test[key],
            "targets": val["targets"],
            "val_stems": val["stems"],
            "test_stems": test["stems"],
            "result": res,
        }
        oof = run_dir / "models" / name / "train_oof.npz"
        if oof.exists():
            with np.load(oof) as z:
                details[name]["oof"], details[name]["oof_targets"] = z["probs"], z["targets"]
    use_oof = all("oof" in details[n] for n in names)
    for name in names[1:]:  # an ensemble of models validated on other images is meaningless
        if not np.array_equal(details[name]["val_stems"], details[names[0]]["val_stems"]):
            raise StaleRunError(
                f"{name} and {names[0]} were validated on different images: "
                "their scores cannot be compared or averaged; retrain one of "
                "them in this run folder"
            )
    if len(names) > 1:
        first = details[names[0]]
        mean = lambda part: np.mean([details[n][part] for n in names], axis=0)
        details["ensemble"] = {
            "val": mean("val"),
            "test": mean("test"),
            "targets": first["targets"],
            "test_stems": first["test_stems"],
            **({"oof": mean("oof"), "oof_targets": first["oof_targets"]} if use_oof else {}),
            "result": {
                k: sum(details[n]["result"][k] for n in names)
                for k in ("train_seconds", "parameters")
            },
        }
    thresholds = {}
    for name, d in details.items():
        t = tune_thresholds(d["targets"], d["val"], shrink, at_least_one)
        d["thresholds"], d["global_threshold"] = t["per_class"], t["global_threshold"]
        if use_oof:  # thresholds from the training images' out-of-fold scores
            o = tune_thresholds(d["oof_targets"], d["oof"], shrink, at_least_one)
            d["thresholds"], d["global_threshold"] = o["per_class"], o["global_threshold"]
            m = evaluate_predictions(d["targets"], d["val"], d["thresholds"], at_least_one)
            t = {
                **t,
                "f1_oof_halves": o["f1_heldout"],
                "f1_oof_halves_sd": o["f1_heldout_sd"],
                "f1_oof_thresholds": m["course_f1"],
                "macro_f1_oof_thresholds": m["macro_f1"],
            }
        thresholds[name] = {
            "global": d["global_threshold"],
            "per_class": d["thresholds"].tolist(),
            "at_least_one": at_least_one,
            "tta": tta,
            "shrink": shrink,
            "source": "out-of-fold training scores" if use_oof else "validation",
        }
        rows.append(
            {
                "model": name,
                **{k: v for k, v in t.items() if k != "per_class"},
                "train_minutes": d["result"]["train_seconds"] / 60,
                "parameters_M": d["result"]["parameters"] / 1e6,
            }
        )
    table = pd.DataFrame(rows).set_index("model")
    with atomic_path(run_dir / "results.csv") as tmp:
        table.to_csv(tmp)
    save_json(thresholds, run_dir / "thresholds.json")
    return table, details


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


def check_model(run_dir: Path | str, settings: dict, retrain: bool = False, log=print,
                test_id: str | None = None) -> str:  # fmt: skip
    """``new``, ``resume``, ``done`` or ``new test images`` for one backbone.

    Its stored settings (training settings, input, the labelled data's digest, the split) are
    compared with ``settings``. Stops with :class:`StaleRunError` when the folder holds this
    backbone trained (or half trained) with other settings, unless ``retrain`` is set: then
    the old files are moved aside and the backbone starts again. A finished backbone whose
    test scores were computed on another test folder (``test_id``) only needs them again:
    ``new test images``. Run for every backbone before any training.
    """
    folder = Path(run_dir) / "models" / settings["backbone"]
    path = folder / "settings.json"
    if not folder.exists() or not any(folder.iterdir()):
        return "new"
    old = load_json(path) if path.exists() else {"(settings.json)": "missing"}
    diffs = differences(old, settings)
    if diffs and not retrain:
        raise StaleRunError(
            stale_message(
                f"backbone {settings['backbone']}",
                diffs,
                Path(run_dir),
                f'OPTIONS = {{"retrain": ["{settings["backbone"]}"]}}',
            )
        )
    if diffs or retrain:
        move_aside(run_dir, folder, log=log)
        return "new"
    if not (folder / "result.json").exists():
        return "resume"
    stale = test_id is not None and test_scores_stale(folder, test_id)
    return "new test images" if stale else "done"
