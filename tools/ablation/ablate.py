"""Ablation of frozen-feature recipes on the 678 labelled real COCO photos.

Why: which backbone, geometry, view, standardisation, head, C and threshold rule to use on a CPU
is measured here, on features cached by extract.py, with thresholds that never see the images
they are scored on; the table in README.md comes from this script (via summarise.py).

Protocol (no threshold ever sees the images it is scored on):
  for each seed: outer --folds multilabel-stratified CV (iterative-stratification, shuffled
  by seed);
    for each outer fold: inner --inner-fold CV on the training part -> out-of-fold (OOF) scores
    of the
    training part; thresholds are chosen on those; the head refitted on the whole training part
    scores the held-out fold, which the thresholds then binarise.
  Metrics of a seed are computed on the 678 pooled held-out predictions (each image scored once,
  by a model and thresholds that never saw it); the mean course F1 of the 5 folds is kept too.

A member = one feature set + one head; its held-out and inner-OOF probabilities are cached per
seed in <dir>/probs/<hash>_s<seed>.npz, so ensembles (mean of member probabilities) cost nothing
more.

Recipe file: one recipe per line, ``name | member & member ... | ens=prob``, a member being
``key=value;key=value`` with keys:
  feat  feature stems joined by '+', e.g. lite2_260_pad_half+lite2_300_pad_half
  ms    how several stems combine: cat (concatenate) | mean (average)          [cat]
  view  avg (mean of plain+flip features) | plain | tta (fit plain, predict mean prob of both)
        | aug (fit on both views as samples, predict mean prob of both)        [avg]
  std   none | z (standardise on the training part) | l2 | l2z                  [z]
  head  logreg | linear | mlp | course (the package's MLP head: Linear->1280, Hardswish,
        Dropout, Linear, as the course's notebook builds it)                  [logreg]
  C     logreg inverse L2 strength: a number, 'tune' (shared, by inner-OOF mAP), or
        'perclass' (per class by inner-OOF AP, shared best for rare classes)  [0.1]
  loss  bce | asl (linear/mlp/course)   epochs, lr, wd, drop, hidden, bs  (linear/mlp/course)
  opt   adamw | adam (the course's; wd ignored)    sched  onecycle | none (constant lr)
  prior 1 | 0: start the output bias at the class log-odds or at zero (the course's) [1]
  split strat (multilabel-stratified outer and inner folds) | random (plain KFold, as a
        random split does: classes can be missing from a fold)                [strat]
Members of one recipe must share ``split``. Threshold rules: see ``thresholds``.
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from common import ResultsCSV, add_dir_argument, criterion, loadavg, work_dir
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.metrics import average_precision_score, f1_score
from sklearn.model_selection import KFold

from cocochallenge import config, models
from cocochallenge import metrics as cm

C_GRID = [0.01, 0.03, 0.1, 0.3, 1.0]
DEFAULTS = {
    "ms": "cat",
    "view": "avg",
    "std": "z",
    "head": "logreg",
    "C": "0.1",
    "loss": "bce",
    "epochs": "100",
    "lr": "1e-3",
    "wd": "1e-4",
    "drop": "0.2",
    "hidden": "512",
    "bs": "64",
    "opt": "adamw",
    "sched": "onecycle",
    "prior": "1",
    "split": "strat",
}


# ---------------------------------------------------------------------------- features
def load_views(feats: Path, stems: str, ms: str):
    """(plain, flip) feature matrices of all 710 rows (678 train, then 32 test)."""
    out = []
    for view in ("plain", "flip"):
        mats = [np.load(feats / f"{s}_{view}.npy") for s in stems.split("+")]
        out.append(np.concatenate(mats, 1) if ms == "cat" else np.mean(mats, 0))
    return out


class Scaler:
    def __init__(self, kind):
        self.kind = kind

    def fit(self, X):
        if "l2" in self.kind:
            X = X / np.linalg.norm(X, axis=1, keepdims=True)
        self.mu = X.mean(0) if self.kind in ("z", "l2z") else 0.0
        self.sd = X.std(0) + 1e-6 if self.kind in ("z", "l2z") else 1.0
        return self

    def __call__(self, X):
        if "l2" in self.kind:
            X = X / np.linalg.norm(X, axis=1, keepdims=True)
        return ((X - self.mu) / self.sd).astype(np.float32)


# ---------------------------------------------------------------------------- heads
def logodds(Y):
    p = np.clip(Y.mean(0), 1e-3, 1 - 1e-3)
    return np.log(p / (1 - p))


def fit_logreg(X, Y, C, seed):
    """L2 logistic regression per class (sklearn's objective C*sum(loss) + |w|^2/2), by L-BFGS.

    ``C`` may be a vector (one per class): the classes are independent problems.
    The same fit as ``cpu_recipe.fit_logistic`` (loss, L-BFGS settings, log-odds bias
    start), kept here because that one takes a single C and z-scores internally (sample sd),
    while the recipes need per-class C (C=perclass), the Scaler variants (std=none|l2|l2z) and
    the population-sd z-scoring the table was measured with."""
    X = torch.as_tensor(X, dtype=torch.float32)
    Yt = torch.as_tensor(Y, dtype=torch.float32)
    invC = torch.as_tensor(
        1.0 / np.broadcast_to(np.asarray(C, dtype=np.float64), (Y.shape[1],)).copy(),
        dtype=torch.float32,
    )
    W = torch.zeros(X.shape[1], Y.shape[1], dtype=torch.float32, requires_grad=True)
    b = torch.as_tensor(logodds(Y), dtype=torch.float32).clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1,
        max_iter=100,
        tolerance_grad=1e-5,
        tolerance_change=1e-7,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = (
            nn.functional.binary_cross_entropy_with_logits(X @ W + b, Yt, reduction="sum")
            + 0.5 * ((W**2).sum(0) * invC).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    Wd, bd = W.detach(), b.detach()
    return lambda Z: (
        torch.sigmoid(torch.as_tensor(Z, dtype=torch.float32) @ Wd + bd).double().numpy()
    )


def fit_torch_head(X, Y, p, seed):
    torch.manual_seed(seed)
    d, C = X.shape[1], Y.shape[1]
    drop = float(p["drop"])
    if p["head"] == "linear":
        net = nn.Sequential(nn.Dropout(drop), nn.Linear(d, C))
    elif p["head"] == "course":
        net = models.make_head(d, "mlp", dropout=drop, num_classes=C)
    else:
        net = nn.Sequential(
            nn.Dropout(drop),
            nn.Linear(d, int(p["hidden"])),
            nn.Hardswish(),
            nn.Dropout(drop),
            nn.Linear(int(p["hidden"]), C),
        )
    if p["prior"] == "1":
        with torch.no_grad():
            net[-1].bias.copy_(torch.as_tensor(logodds(Y), dtype=torch.float32))
    crit = criterion(p["loss"])
    if p["opt"] == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=float(p["lr"]))
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=float(p["lr"]), weight_decay=float(p["wd"]))
    Xt, Yt = torch.as_tensor(X), torch.as_tensor(Y, dtype=torch.float32)
    bs, n = int(p["bs"]), len(X)
    epochs = int(p["epochs"])
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=float(p["lr"]), total_steps=epochs * ((n + bs - 1) // bs)
        )
        if p["sched"] == "onecycle"
        else None
    )
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            loss = crit(net(Xt[idx]), Yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    net.eval()

    def predict(Z):
        with torch.no_grad():
            return torch.sigmoid(net(torch.as_tensor(Z, dtype=torch.float32))).double().numpy()

    return predict


def fit_predict(p, views, Y, tr, te_list, seed, C=None):
    """Fit the member's head on rows ``tr``; probabilities for each index array in te_list."""
    plain, flip = views
    if p["view"] == "avg":
        Xtr, Ytr = (plain[tr] + flip[tr]) / 2, Y[tr]
    elif p["view"] in ("plain", "tta"):
        Xtr, Ytr = plain[tr], Y[tr]
    else:  # aug
        Xtr, Ytr = np.concatenate([plain[tr], flip[tr]]), np.concatenate([Y[tr], Y[tr]])
    sc = Scaler(p["std"]).fit(Xtr)
    Xtr = sc(Xtr)
    if p["head"] == "logreg":
        model = fit_logreg(Xtr, Ytr, C, seed)
    else:
        model = fit_torch_head(Xtr, Ytr, p, seed)
    outs = []
    for te in te_list:
        if p["view"] == "avg":
            outs.append(model(sc((plain[te] + flip[te]) / 2)))
        elif p["view"] == "plain":
            outs.append(model(sc(plain[te])))
        else:
            outs.append((model(sc(plain[te])) + model(sc(flip[te]))) / 2)
    return outs


def class_ap(Y, P):
    out = np.full(Y.shape[1], np.nan)
    for c in range(Y.shape[1]):
        if 0 < Y[:, c].sum() < len(Y):
            out[c] = average_precision_score(Y[:, c], P[:, c])
    return out


def member_settings(spec: str) -> dict:
    return dict(DEFAULTS, **dict(kv.split("=") for kv in spec.split(";")))


def member_probs(spec: str, seed: int, folds, Y, inner_folds, feats: Path, probs: Path):
    """Held-out probs (N,80) and inner-OOF probs (K,N,80; NaN on the outer fold's rows), cached.

    The cache key covers the member's settings and the fold counts (the scratch version keyed
    on the settings only, so a run with other --folds/--inner could reuse stale probabilities)."""
    p = member_settings(spec)
    n_inner = len(next(iter(inner_folds.values())))
    key_items = sorted(p.items()) + [("folds", len(folds)), ("inner", n_inner)]
    key = hashlib.sha1(json.dumps(key_items).encode()).hexdigest()[:12]
    path = probs / f"{key}_s{seed}.npz"
    if path.exists():
        z = np.load(path)
        return z["val"], z["oof"], float(z["fit_s"])
    views = [v[: len(Y)] for v in load_views(feats, p["feat"], p["ms"])]
    N, K = len(Y), len(folds)
    val = np.zeros((N, Y.shape[1]))
    oof = np.full((K, N, Y.shape[1]), np.nan)
    t0 = time.perf_counter()
    fold_times = []
    for k, (tr, te) in enumerate(folds):
        tf = time.perf_counter()
        Cs = (
            C_GRID
            if p["head"] == "logreg" and p["C"] in ("tune", "perclass")
            else [float(p["C"])]
            if p["head"] == "logreg"
            else [None]
        )
        oof_by_C = {C: np.zeros((len(tr), Y.shape[1])) for C in Cs}
        for itr, ite in inner_folds[(seed, k)]:
            for C in Cs:
                oof_by_C[C][ite] = fit_predict(p, views, Y, tr[itr], [tr[ite]], seed, C)[0]
        if len(Cs) == 1:
            C_use, o = Cs[0], oof_by_C[Cs[0]]
        else:
            aps = {C: class_ap(Y[tr], oof_by_C[C]) for C in Cs}
            Cbest = max(Cs, key=lambda C: np.nanmean(aps[C]))
            if p["C"] == "tune":
                C_use, o = Cbest, oof_by_C[Cbest]
            else:
                npos = Y[tr].sum(0)
                C_use = np.array(
                    [
                        Cbest if npos[c] < 8 else max(Cs, key=lambda C: aps[C][c])
                        for c in range(Y.shape[1])
                    ]
                )
                o = np.stack([oof_by_C[C_use[c]][:, c] for c in range(Y.shape[1])], 1)
        oof[k, tr] = o
        val[te] = fit_predict(p, views, Y, tr, [te], seed, C_use)[0]
        fold_times.append(time.perf_counter() - tf)
    fit_s = (time.perf_counter() - t0) / K
    probs.mkdir(parents=True, exist_ok=True)
    np.savez(path, val=val, oof=oof, fit_s=fit_s)
    return val, oof, fit_s


# ---------------------------------------------------------------------------- thresholds
def thresholds(rule: str, Y, P):
    """Threshold vector from the training part's OOF scores ``P``; rules:
    raw0.5 (the course's: raw output > 0.5, i.e. probability > sigmoid(0.5) = 0.62)
    | fixed0.5 | global | perclass<m> (per-class F1-best, classes under m positives -> global)
    | shrink<k> (per-class F1-best pulled toward the global one: (n t_c + k t_g)/(n + k))."""
    C = Y.shape[1]
    if rule == "raw0.5":
        return np.full(C, 1.0 / (1.0 + np.exp(-0.5)))
    if rule == "fixed0.5":
        return np.full(C, 0.5)
    if rule.startswith("shrink"):
        return cm.shrunk_thresholds(Y, P, k=float(rule[6:]))
    tg = cm.best_global_threshold(Y, P)[0]
    if rule == "global":
        return np.full(C, tg)
    if rule.startswith("perclass"):
        return cm.per_class_thresholds(Y, P, min_positives=int(rule[8:]), fallback=tg)
    raise ValueError(rule)


def metrics(Y, P, pred):
    y = Y.astype(bool)
    return {
        "course_f1": cm.course_f1(y, pred)["f1"],
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(y, pred, average="micro", zero_division=0)),
        "mAP": cm.mean_average_precision(y, P),
        "labels_per_img": float(pred.sum(1).mean()),
    }


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dir_argument(ap)
    ap.add_argument(
        "--feats", default="", help="feature cache of extract.py (default: <dir>/feats)"
    )
    ap.add_argument("--recipes", required=True, help="recipe file (see above)")
    ap.add_argument("--only", default="", help="comma list of recipe names to run")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument(
        "--rules", default="fixed0.5,global,perclass5,perclass3,shrink3,shrink10,shrink30"
    )
    ap.add_argument(
        "--out", default="", help="per-seed results, appended (default: <dir>/results_per_seed.csv)"
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(config.keep_freed_memory(), flush=True)
    torch.set_num_threads(args.threads)
    out = work_dir(args.dir)
    feats = Path(args.feats) if args.feats else out / "feats"
    probs = out / "probs"
    args.out = args.out or str(out / "results_per_seed.csv")
    Y = np.load(feats / "labels.npy").astype(np.int64)
    seeds = [int(s) for s in args.seeds.split(",")]
    folds, inner = {"strat": {}, "random": {}}, {"strat": {}, "random": {}}
    kinds = {"strat": MultilabelStratifiedKFold, "random": KFold}
    for kind, Splitter in kinds.items():
        for s in seeds:
            folds[kind][s] = [
                (tr, te)
                for tr, te in Splitter(args.folds, shuffle=True, random_state=s).split(
                    np.zeros(len(Y)), Y
                )
            ]
            for k, (tr, _te) in enumerate(folds[kind][s]):
                inner[kind][(s, k)] = list(
                    Splitter(args.inner, shuffle=True, random_state=1000 + s).split(
                        np.zeros(len(tr)), Y[tr]
                    )
                )
    recipes = []
    for line in Path(args.recipes).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, members, ens = (x.strip() for x in (line.split("|") + ["ens=prob"])[:3])
        if args.only and name not in args.only.split(","):
            continue
        recipes.append((name, [m.strip() for m in members.split("&")], ens.split("=")[1]))
    with ResultsCSV(args.out) as results:
        for name, members, ens in recipes:
            kind = {member_settings(m)["split"] for m in members}
            if len(kind) != 1:
                raise SystemExit(f"{name}: the members of an ensemble must share one split kind")
            kind = kind.pop()
            for s in seeds:
                la = loadavg()
                outs = [
                    member_probs(m, s, folds[kind][s], Y, inner[kind], feats, probs)
                    for m in members
                ]
                fit_s = sum(o[2] for o in outs)
                if ens == "logit":
                    lg = lambda a: np.log(
                        np.clip(a, 1e-7, 1 - 1e-7) / (1 - np.clip(a, 1e-7, 1 - 1e-7))
                    )
                    sig = lambda a: 1 / (1 + np.exp(-a))
                    val = sig(np.mean([lg(o[0]) for o in outs], 0))
                    oof = sig(np.mean([lg(o[1]) for o in outs], 0))
                else:
                    val = np.mean([o[0] for o in outs], 0)
                    oof = np.mean([o[1] for o in outs], 0)
                for rule in args.rules.split(","):
                    for top1 in (False, True):
                        pred = np.zeros_like(Y, dtype=bool)
                        fold_f1 = []
                        for k, (tr, te) in enumerate(folds[kind][s]):
                            t = thresholds(rule, Y[tr], oof[k, tr])
                            pred[te] = cm.apply_thresholds(val[te], t, at_least_one=top1)
                            fold_f1.append(cm.course_f1(Y[te], pred[te])["f1"])
                        row = {
                            "recipe": name,
                            "rule": rule,
                            "top1": int(top1),
                            "seed": s,
                            **metrics(Y, val, pred),
                            "course_f1_foldmean": float(np.mean(fold_f1)),
                            "fit_s_per_outer_fold": round(fit_s, 2),
                            "loadavg": la,
                            "members": " & ".join(members),
                            "ens": ens,
                        }
                        results.write(row)
                print(f"{name} seed {s}: fit {fit_s:.1f}s/outer fold, load {la}", flush=True)


if __name__ == "__main__":
    main()
