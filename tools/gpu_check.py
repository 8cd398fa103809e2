"""The prepared GPU check: the CUDA code paths, the benchmark's GPU part and the smoke notebook.

    python tools/gpu_check.py            # on a CUDA machine; prints a pass/fail table (< 5 minutes)

Each check runs the project's own functions on the GPU against the plain float32 path (the same
comparisons tests/test_gpu_path.py makes on a CPU), then ``benchmark.py --device cuda --quick``
and ``run.py --smoke`` on CUDA. A check that fails prints why; the others go on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

RESULTS = []


def check(name):
    def wrap(fn):
        t0 = time.perf_counter()
        try:
            detail = fn() or ""
            RESULTS.append((name, "PASS", time.perf_counter() - t0, detail))
        except Exception as err:  # report and go on: one table at the end
            traceback.print_exc()
            RESULTS.append(
                (name, "FAIL", time.perf_counter() - t0, f"{type(err).__name__}: {err}"[:150])
            )
        return fn

    return wrap


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device here: this script is for the GPU machine")
        return 2
    import helpers as h
    from cocochallenge import config, data, demo, models, training, transforms

    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    root = Path(os.environ.get("TMPDIR", "/tmp")) / "gpu-check" / "ms-coco"
    demo.make_demo_data(root, n_train=256, n_test=16, seed=0, progress=False)
    ds = h.COCOTrainImageDataset(root / "images/train-resized", root / "labels/train")
    prior = data.labels_of(ds).mean(0)
    model, pre = models.build_model("efficientnet_lite0", pretrained=True, prior=prior)
    model = model.to(dev, memory_format=torch.channels_last).eval()
    subset = data.LabelledSubset(ds, np.arange(256), transforms.build_transform(pre))
    plain_loader = transforms.make_loader(subset, 64, False, dev, workers=0)
    ref = training.predict(
        model, plain_loader, dev, tta_flip=True, stacked=False, show_progress=False
    )

    def close_to_ref(out, tol, key="probs_tta") -> float:
        """Largest difference from the plain float32 predictions; fails above ``tol``."""
        d = float(np.abs(out[key] - ref[key]).max())
        assert d < tol, d
        return d

    @check("amp_settings: bfloat16, no scaler")
    def _():
        amp, scaler = config.amp_settings(dev, True)
        assert amp is torch.bfloat16 and scaler is None, (amp, scaler)
        return str(amp)

    @check("bf16 autocast predictions vs fp32 (atol 0.03)")
    def _():
        out = training.predict(
            model, plain_loader, dev, tta_flip=True, amp_dtype=torch.bfloat16, show_progress=False
        )
        return f"max |diff| {close_to_ref(out, 0.03):.4f}"

    @check("stacked flip-TTA batch vs two calls (atol 1e-4)")
    def _():
        out = training.predict(
            model, plain_loader, dev, tta_flip=True, stacked=True, show_progress=False
        )
        return f"max |diff| {close_to_ref(out, 1e-4):.2e}"

    @check("GPU loader (8 workers, pinned, persistent) vs workers=0")
    def _():
        loader = transforms.make_loader(subset, 64, False, dev, workers=8)
        assert loader.num_workers > 0 and loader.pin_memory and loader.persistent_workers
        out = training.predict(
            model, loader, dev, tta_flip=True, stacked=False, show_progress=False
        )
        return f"max |diff| {close_to_ref(out, 1e-5):.2e}, {loader.num_workers} workers"

    @check("train_loop: bf16 + fused AdamW + channels-last + EMA, 2 epochs")
    def _():
        from cocochallenge import metrics

        m, _ = models.build_model("efficientnet_lite0", pretrained=True, prior=prior)
        m = m.to(dev, memory_format=torch.channels_last)
        m.freeze_bn = True
        opt = training.make_optimizer(models.param_groups(m, 3e-4, 0.1), dev, 3e-4)
        sched = training.warmup_cosine(opt, 8, 2)
        augmented = data.LabelledSubset(ds, np.arange(256), transforms.build_transform(pre, True))
        train_loader = transforms.make_loader(augmented, 64, True, dev, workers=8)
        ema = training.make_ema(m, len(train_loader), 1.0)
        crit = torch.nn.BCEWithLogitsLoss()
        extras = dict(scheduler=sched, amp_dtype=torch.bfloat16, ema=ema)
        losses = [h.train_loop(train_loader, m, crit, opt, dev, **extras)["loss"] for _ in range(2)]
        assert all(np.isfinite(losses)), losses
        y = data.labels_of(ds)[:256]
        maps = []
        for net in (m, ema.module):
            with training.autocast(dev, torch.bfloat16):
                val = h.validation_loop(
                    plain_loader,
                    net,
                    crit,
                    80,
                    dev,
                    multi_label=True,
                    th_multi_label=0.0,
                    one_hot=True,
                    keep_probs=True,
                )
            maps.append(metrics.mean_average_precision(y, val["probs"]))
        assert np.isfinite(maps).all(), maps
        return (
            f"losses {losses[0]:.4f} -> {losses[1]:.4f}, val mAP {maps[0]:.3f}, EMA {maps[1]:.3f}"
        )

    @check("torch.compile(Lite0) vs eager (atol 1e-3)")
    def _():
        compiled = torch.compile(model)
        out = training.predict(compiled, plain_loader, dev, show_progress=False)
        return f"max |diff| {close_to_ref(out, 1e-3, key='probs'):.2e}"

    def command(name, args, env=None, timeout=240):
        @check(name)
        def _():
            proc = subprocess.run(
                args,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**os.environ, **(env or {})},
            )
            print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
            assert proc.returncode == 0, f"exit {proc.returncode}"
            return proc.stdout.strip().splitlines()[-1][:120] if proc.stdout.strip() else ""

    command(
        "benchmark.py --device cuda --quick",
        [
            sys.executable,
            "benchmark.py",
            "--device",
            "cuda",
            "--quick",
            "--json",
            str(root.parent / "bench.json"),
        ],
    )
    options = {
        "img_size": 128,
        "demo_train": 160,
        "demo_test": 40,
        "device": "cuda",
        "demo_dir": str(root.parent / "smoke-demo" / "ms-coco"),
    }
    command(
        "run.py --smoke on CUDA",
        [
            sys.executable,
            "run.py",
            "--smoke",
            "--run-dir",
            str(root.parent / "smoke"),
            "-p",
            "OPTIONS",
            repr(options),
        ],
    )

    print(f"\n{'check':<58} {'result':<6} {'s':>6}  detail")
    for name, status, seconds, detail in RESULTS:
        print(f"{name:<58} {status:<6} {seconds:6.1f}  {detail}")
    return 0 if all(r[1] == "PASS" for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
