"""The offline CPU recipe: frozen EfficientNet-Lite features, logistic heads, held-out thresholds.

Not the course's workflow (that is ``challenge.ipynb``, made for a GPU): what scored best on
real photos within a few minutes of a 2-core CPU, for a machine without a GPU. ``python run.py
--data-root DIR`` runs it when there is no GPU and no backbone is named, and says so. It
writes the run folder ``challenge.ipynb`` writes (the same files, see :mod:`runs`), so
``analysis.ipynb`` reads it like any run.

Six frozen feature sets: EfficientNet-Lite0, Lite1 and Lite2, each at the input size of its
weights and at 384 px (COCO objects are often small). Per feature set, pooled features of
every image, computed once; one L2 logistic regression fitted by L-BFGS on the training
images' features (no epochs, no learning rate); and the out-of-fold probabilities of the
training images from five more fits. The submission is the mean of the six heads'
probabilities, always: picking the best model on the printed scores cost 0.003-0.005 course
F1 on held-out photos. Its thresholds are tuned on the out-of-fold scores (hundreds of images
instead of the validation split's few dozen), and the run prints the course F1 to expect on a
test folder of this size, with the range such test sets show (:func:`compare.expected_course_f1`).
The evidence: README, "The offline CPU recipe".
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import helpers as h
from cocochallenge import (
    checkpoints,
    compare,
    config,
    data,
    files,
    metrics,
    models,
    runs,
    scan,
    split,
    submission,
    training,
    transforms,
)

#: The feature sets of the recipe: (backbone, input size; 0 = the size of its weights).
MEMBERS = [
    ("efficientnet_lite0", 0),
    ("efficientnet_lite1", 0),
    ("efficientnet_lite2", 0),
    ("efficientnet_lite0", 384),
    ("efficientnet_lite1", 384),
    ("efficientnet_lite2", 384),
]


def member_name(backbone: str, size: int = 0) -> str:
    """The run folder's name for a feature set: the backbone, with its size when not native."""
    return f"{backbone}_{size}px" if size else backbone


def fit_logistic(feats: torch.Tensor, targets, C: float = 0.1, max_iter: int = 100) -> nn.Linear:
    """L2-regularised logistic regression of the 80 classes on frozen features, an ``nn.Linear``.

    The features are z-scored (training rows' mean and std), the loss is the summed BCE plus
    ``0.5 * |W|^2 / C``, the bias starts at the class log-odds, and L-BFGS minimises it in
    float32. The z-scoring is folded into the returned layer, which then takes raw features
    like any head. Measured on 678 real COCO photos (3 seeds of 5-fold CV): C 0.03-0.3 within
    0.01 course F1 of each other.
    """
    x = feats.float()
    y = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    prior = y.mean(0).clamp(1e-3, 1 - 1e-3)
    w = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    b = torch.log(prior / (1 - prior)).clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=max_iter,
        history_size=10,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-5,
        tolerance_change=1e-7,
    )

    def closure():
        opt.zero_grad()
        bce = nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="sum")
        loss = bce + 0.5 * (w * w).sum() / C
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    layer = nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():
        layer.weight.copy_((w / std[:, None]).T)
        layer.bias.copy_(b - (mean / std) @ w)
    return layer


def thresholds_for(y, probs, shrink: float = 10.0) -> tuple[float, np.ndarray]:
    """The submission's rule, as the challenge notebook applies it (section 9): per class, shrunk
    toward the best single threshold by ``shrink`` positives; ``(global, per class)``."""
    best, _ = metrics.best_global_threshold(y, probs)
    return best, metrics.shrunk_thresholds(y, probs, shrink, best)


def out_of_fold_probs(
    feats: torch.Tensor, targets, C: float = 0.1, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Probabilities of every training row from a :func:`fit_logistic` that never saw it.

    Thresholds tuned on these out-of-fold scores of the whole training part (instead of the
    10% validation split) hold out what they tune, and leave the validation split to measure
    them. Folds are multi-label stratified, like the split.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    y = np.asarray(targets)
    out = np.zeros(y.shape, dtype=np.float32)
    kfold = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for tr, te in kfold.split(np.zeros(len(y)), y):
        layer = fit_logistic(feats[tr], y[tr], C)
        with torch.no_grad():
            out[te] = torch.sigmoid(layer(feats[te].float())).numpy()
    return out


def run(
    data_root: Path | str,
    run_dir: Path | str,
    members=tuple(MEMBERS),
    C: float = 0.1,
    seed: int = 0,
    val_fraction: float = 0.1,
    batch_size: int = 32,
    log=print,
) -> dict:
    """Fit the recipe on ``data_root`` into ``run_dir``; write the submission; its summary."""
    t_start = time.perf_counter()
    took = files.hold_run_folder(run_dir, log=log)  # one training run per folder: until it ends
    log(config.keep_freed_memory())
    names = [member_name(*m) for m in members]
    # the library's options (COCO_OPTIONS may change them); the arguments are the parameters, and
    # no COCO_<NAME> variable overrides them (the tests set those for the notebooks)
    cfg, _ = config.settings({"OPTIONS": {}})
    cfg.update(data_root=str(data_root), run_dir=str(run_dir), backbones=names, seed=seed,
               val_fraction=val_fraction, batch_size=batch_size, C=C,
               recipe="offline CPU recipe (cocochallenge.cpu_recipe)")  # fmt: skip
    device = config.pick_device(cfg["device"])
    data_root, is_demo = data.resolve_data_root(data_root)
    paths = data.data_paths(data_root)
    found = scan.scan_data(data_root)
    train_set = h.COCOTrainImageDataset(paths["train_images"], paths["train_labels"])
    data.drop_images(train_set, found["skip"])
    test_set = h.COCOTestImageDataset(paths["test_images"])
    notes = []
    Y = data.labels_of(train_set, notes)
    scan.report_data(found, notes, log=log)
    stems, inventory = data.stems(train_set), data.inventory(train_set, Y)
    test_id = data.test_digest(test_set)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tr, va = split.load_or_make_split(stems, Y, run_dir / "split.json", val_fraction, seed,
                                      inventory)  # fmt: skip
    split_id = files.load_json(run_dir / "split.json")["id"]
    log(f"{len(tr)} train / {len(va)} validation / {len(test_set)} test images (split {split_id})")
    runs.prepare_run_dir(cfg)
    for (backbone, size), name in zip(members, names):
        out = run_dir / "models" / name
        if (out / "result.json").exists() and not runs.test_scores_stale(out, test_id):
            log(f"{name}: already fitted in this run folder, reused")
            continue
        t0 = time.perf_counter()
        model, _ = models.build_model(backbone, head="logistic")
        model.eval()
        pre = models.preprocess_for(backbone, size)
        tf = transforms.build_transform(pre, train=False)
        loader = lambda ds: transforms.make_loader(ds, batch_size, False, device, cfg["workers"])
        parts = {
            "train": data.LabelledSubset(train_set, tr, tf),
            "val": data.LabelledSubset(train_set, va, tf),
            "test": data.with_transform(test_set, tf),
        }
        images = {"train": split_id, "val": split_id, "test": test_id}
        feats = {
            part: training.cached_features(
                out / f"features_{part}.pt",
                model.backbone,
                loader(ds),
                device,
                key={"backbone": backbone, **pre, "images": images[part], "part": part},
                show_progress=cfg["progress"],
            )
            for part, ds in parts.items()
        }
        model.head[-1] = fit_logistic(feats["train"], Y[tr], C)
        oof = out_of_fold_probs(feats["train"], Y[tr], C, seed=seed)
        with torch.no_grad():
            probs = {p: torch.sigmoid(model.head(f.float())).numpy() for p, f in feats.items()}
        val_mAP = metrics.mean_average_precision(Y[va], probs["val"])
        files.save_npz(out / "train_oof.npz", probs=oof, targets=Y[tr])
        row = {"phase": "frozen", "epoch": 1, "global_epoch": 1, "val_mAP": val_mAP}
        checkpoints.PhaseCheckpoint(out, "frozen", {"model": model.head}).save(
            0, row, val_mAP, val_probs=probs["val"]
        )  # the head, for analysis.ipynb's class activation maps
        files.save_npz(
            out / "val_scores.npz",
            probs=probs["val"],
            probs_tta=probs["val"],
            targets=Y[va],
            stems=np.array(parts["val"].stems),
        )
        files.save_npz(
            out / "test_scores.npz",
            probs=probs["test"],
            probs_tta=probs["test"],
            stems=np.array(data.stems(test_set)),
            data=np.array(test_id),
        )
        seconds = time.perf_counter() - t0
        files.save_json([{**row, "seconds": seconds}], out / "history.json")
        files.save_json(
            {
                "name": name,
                "backbone": backbone,
                "img_size": pre["size"],
                "head": "logistic",
                "best_phase": "frozen (logistic)",
                "best_val_mAP": val_mAP,
                "train_seconds": seconds,
                "parameters": models.count_parameters(model),
                "val_images_per_second": None,
            },
            out / "result.json",
        )
        log(
            f"{name}: features of {sum(len(f) for f in feats.values())} images, logistic head "
            f"and out-of-fold scores in {seconds:.0f}s; validation mAP {val_mAP:.4f}"
        )
    # the notebook's steps (challenge.ipynb, section 9) with out-of-fold training scores in place
    # of the validation split's: the same threshold rule, the ensemble always
    val = {n: runs.load_scores(run_dir, n, "val") for n in names}
    runs.same_images(val)
    scores = {n: {"val": val[n]["probs"], "test": runs.load_scores(run_dir, n, "test")["probs"],
                  "oof": files.load_npz(run_dir / "models" / n / "train_oof.npz")["probs"]}
              for n in names}  # fmt: skip
    if len(names) > 1:
        scores["ensemble"] = {
            k: np.mean([scores[n][k] for n in names], axis=0) for k in scores[names[0]]
        }
    y_oof, y_val = Y[tr], val[names[0]]["targets"]
    top1, rows, saved = cfg["at_least_one"], {}, {}
    for m, s in scores.items():
        g, t = thresholds_for(y_oof, s["oof"], cfg["shrink"])
        saved[m] = {"global": g, "per_class": t.tolist(), "view": "plain", "at_least_one": top1,
                    "shrink": cfg["shrink"], "source": "out-of-fold training scores"}  # fmt: skip
        pred = metrics.apply_thresholds(s["val"], t, top1)
        rows[m] = {"course F1, out-of-fold thresholds": metrics.course_f1(y_val, pred)["f1"],
                   "mAP": metrics.mean_average_precision(y_val, s["val"])}  # fmt: skip
    table = pd.DataFrame(rows).T
    table.to_csv(run_dir / "results.csv")
    files.save_json(saved, run_dir / "thresholds.json")
    log(table.round(4).to_string())
    best = "ensemble" if len(names) > 1 else names[0]
    chosen = {**scores[best], "thresholds": np.asarray(saved[best]["per_class"])}
    estimate = compare.expected_course_f1(
        y_oof, chosen["oof"], len(test_set), cfg["shrink"], cfg["at_least_one"]
    )
    log(
        f"expected course F1 on {estimate['n']} new photos like the training ones: "
        f"{estimate['expected']:.3f}; 80% of such test sets score {estimate['p10']:.3f} to "
        f"{estimate['p90']:.3f} (out-of-fold scores, cross-fitted thresholds; a little low: "
        "its models learnt from 80% of the training images)"
    )
    pred = metrics.apply_thresholds(chosen["test"], chosen["thresholds"], cfg["at_least_one"])
    sub = submission.predictions_to_submission(data.stems(test_set), pred)
    path = submission.write_submission(sub, run_dir / "submission.json", paths["test_images"])
    summary = {
        "chosen": best,
        "expected_course_f1": estimate,
        "submission": str(path),
        "data_root": str(data_root),
        "demo": is_demo,
        "seconds": time.perf_counter() - t_start,
    }
    files.save_json(summary, run_dir / "summary.json")
    log(f"chosen: {best}; submission {files.shown_path(path)} ({len(sub)} test images)")
    if took:  # the analysis may read the folder now (else at exit, or after an error)
        files.release_run_folder(run_dir)
    return summary
