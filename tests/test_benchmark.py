"""The benchmark: a quick run of the real command, and the pieces its fairness rests on."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import benchmark
import helpers as h

ROOT = Path(__file__).resolve().parents[1]


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_prints_table_then_one_json_line_with_every_figure(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmark.py"),
            "--quick",
            "--device",
            "cpu",
            "--json",
            str(out_json),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    res = json.loads(lines[-1])  # the last line is the JSON object
    assert res == json.loads(out_json.read_text())
    table = "\n".join(lines[:-1])
    for header in (
        "1. Frozen phase",
        "2. Training DataLoader",
        "3. Fine-tuning",
        "4. Inference",
        "5. Peak memory",
        "6. Dataset + split",
        "8. The analysis",
        "Targets",
    ):
        assert header in table

    for key in (
        "benchmark",
        "version",
        "device",
        "settings",
        "frozen",
        "loader",
        "finetune",
        "inference",
        "memory",
        "labels",
        "analysis",
        "projection",
        "targets",
        "notes",
        "total_seconds",
    ):
        assert key in res, key
    assert res["device"]["type"] == "cpu" and res["device"]["torch"] == torch.__version__
    assert res["settings"]["quick"] is True

    fr = res["frozen"]
    for side in ("course", "fast"):
        assert _finite_positive(fr[side]["seconds"])
        assert 0 <= fr[side]["val_mAP"] <= 1
        assert _finite_positive(fr[side]["seconds_wall"])
    assert fr["course"]["epochs_measured"] == fr["epochs"] and not fr["course"]["extrapolated"]
    assert _finite_positive(fr["fast"]["feature_seconds"]) and fr["fast"]["repeats"] >= 1
    assert _finite_positive(fr["speedup"]) and _finite_positive(fr["speedup_wall"])
    assert len(fr["course"]["epoch_seconds"]) == fr["epochs"]
    # same head, same batches, same dropout masks: only the fp16 cache separates the two
    assert fr["mAP_diff"] < 0.01
    assert fr["n_train"] + fr["n_val"] == res["settings"]["n_images"] + res["settings"]["n_val"]
    line = fr["feature_line"]  # the feature pass at two sizes, one pass and two loaders
    assert line["sizes"][0] < line["sizes"][1] == fr["n_train"] + fr["n_val"]
    for way in ("one pass", "two loaders"):
        assert all(_finite_positive(v) for v in line[way]["seconds"])
    for key in ("benchmark_epochs", "notebook_epochs"):
        assert _finite_positive(fr["course_size"][key]["course_seconds"])
    assert fr["course_size"]["notebook_epochs"]["epochs"] == benchmark.REAL_RUN["epochs_frozen"]

    lo = res["loader"]
    for side in ("course", "fast"):
        assert _finite_positive(lo[side]["images_per_s"]) and lo[side]["images_timed"] > 0
    assert _finite_positive(lo["ratio"])

    names = res["settings"]["backbones"]
    assert set(res["finetune"]) == set(names) == set(res["inference"])
    for name in names:
        ft, inf = res["finetune"][name], res["inference"][name]
        for key in ("course_images_per_s", "fast_images_per_s", "ratio"):
            assert _finite_positive(ft[key]), (name, key)
        for key in (
            "course_images_per_s",
            "course_tta_images_per_s",
            "fast_images_per_s",
            "fast_tta_images_per_s",
            "ratio",
            "ratio_tta",
        ):
            assert _finite_positive(inf[key]), (name, key)
        assert name in res["projection"]["per_backbone"]

    mem = res["memory"]
    assert _finite_positive(mem["process_peak_rss_mb"])
    assert {"frozen", "loader", "labels"} <= set(mem["sections"])
    for part in mem["sections"].values():
        assert _finite_positive(part["peak_rss_mb"]) and part["cuda_max_allocated_mb"] is None

    lb = res["labels"]
    assert lb["n_files"] == res["settings"]["label_files"] == lb["n_train"] + lb["n_val"]
    for key in ("seconds", "dataset_seconds", "split_seconds", "peak_rss_mb", "baseline_rss_mb"):
        assert _finite_positive(lb[key]), key
    assert lb["peak_rss_mb"] >= lb["baseline_rss_mb"] * 0.9
    assert lb["classes_on_both_sides"] == lb["classes_with_2_plus"]
    assert _finite_positive(lb["loaders_seconds"])  # the notebook's loaders on those ids
    assert lb["loaders_rows"]["train"] == lb["n_train"] and lb["loaders_rows"]["val"] == lb["n_val"]

    an = res["analysis"]
    assert (an["n_images"], an["n_networks"], an["n_boot"]) == (600, 3, 100)
    for key in ("comparison_seconds", "analysis_seconds", "comparison_peak_rss_mb",
                "analysis_peak_rss_mb"):  # fmt: skip
        assert _finite_positive(an[key]), key
    assert {"study", "frozen_against_finetuned", "threshold_steps", "expected_course_f1"} <= set(
        an["analysis_steps"]
    )

    t = res["targets"]
    for key in (
        "frozen_speedup_at_least_10x",
        "frozen_mAP_within_0.01",
        "labels_under_15s",
        "labels_under_200MB",
        "labels_full_size",
        "comparison_under_20s",
        "analysis_under_180s",
        "analysis_full_size",
        "finetune_library_faster",
        "inference_library_faster",
        "gpu_finetune_at_least_2x",
        "gpu_loader_not_bottleneck",
    ):
        assert key in t, key
    assert t["frozen_mAP_within_0.01"] is True and t["labels_full_size"] is False
    assert t["analysis_full_size"] is False
    assert t["gpu_finetune_at_least_2x"] is None and t["gpu_loader_not_bottleneck"] is None
    assert set(t["finetune_library_faster"]) == set(names)


def test_course_sampler_replays_the_order_of_the_feature_batches():
    """The frozen comparison is fair only if both sides see the same batches in the same order."""
    n, seed, epoch = 37, 5, 3
    sampler = benchmark.EpochPermutation(n, seed)
    sampler.set_epoch(epoch)
    gen = torch.Generator()
    gen.manual_seed(seed * 7919 + epoch)
    assert list(sampler) == torch.randperm(n, generator=gen).tolist()

    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 80)

        def forward(self, x):
            seen.extend(x[:, 0].long().tolist())
            return self.lin(x)

    feats = torch.arange(n, dtype=torch.float32)[:, None]
    head = Recorder()
    opt = torch.optim.SGD(head.parameters(), lr=0.0)
    h.train_loop(
        benchmark.feature_batches(feats, np.zeros((n, 80)), sampler, 8),
        head,
        torch.nn.BCEWithLogitsLoss(),
        opt,
        "cpu",
    )
    assert seen == list(sampler)
    course_seen = [
        int(x[0])
        for batch in torch.utils.data.DataLoader(feats, batch_size=8, sampler=sampler)
        for x in batch
    ]
    assert course_seen == seen


def test_projection_uses_the_slower_of_compute_and_loader():
    ft = {"mobilenet_v3_large": {"fast_images_per_s": 1000.0, "course_images_per_s": 400.0}}
    inf = {
        "mobilenet_v3_large": {
            "fast_images_per_s": 2000.0,
            "fast_tta_images_per_s": 1000.0,
            "course_images_per_s": 800.0,
            "course_tta_images_per_s": 400.0,
        }
    }
    loader = {"fast": {"images_per_s": 500.0}, "course": {"images_per_s": 100.0}}
    pr = benchmark.project(ft, inf, loader)
    per = pr["per_backbone"]["mobilenet_v3_large"]
    assert per["finetune_bottleneck"] == "loader"
    r = benchmark.REAL_RUN
    expected = (
        (r["n_train"] + r["n_val"]) / 500
        + r["epochs_finetune"] * (r["n_train"] + r["n_val"]) / 500
        + (r["n_val"] + r["n_test"]) / 500
    ) / 3600
    assert np.isclose(per["fast_hours"], expected)
    assert per["course_hours"] > per["fast_hours"]
    assert pr["complete"] is False and pr["fast_hours"] is None


def test_synthetic_run_is_long_tailed_and_paired():
    """Part 8's scores: COCO's imbalance (person in about half the images, rare classes in a
    few), better networks score better, and all share what makes an image hard."""
    from cocochallenge import metrics

    run = benchmark.synthetic_run(2000, 3, seed=0)
    y = run.targets
    share = y.mean(0)
    assert 0.4 < share[0] < 0.6 and (y.sum(0) < 15).sum() >= 5 and 2 < y.sum(1).mean() < 3.5
    maps = [metrics.mean_average_precision(y, run.val[m]["probs"]) for m in run.names]
    assert maps == sorted(maps) and set(run.models) == {*run.names, "ensemble"}
    a, b = (run.val[m]["probs"][y == 0] for m in run.names[:2])  # the same hard negatives
    assert np.corrcoef(a, b)[0, 1] > 0.2
