"""The README's main job, headless, on real COCO photos, scored like the leaderboard: loader
workers and progress bars on, and not one traceback in any cell's output or in the log."""

import json
import os
import subprocess
import sys
from pathlib import Path

from cocochallenge import submission

ROOT = Path(__file__).resolve().parents[1]


def test_headless_run_on_real_photos(real_dev, tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCO_")}
    options = {"img_size": 96, "workers": 2, "progress": True}
    params = {
        "VAL_FRACTION": "0.25",
        "EPOCHS_FROZEN": "2",
        "EPOCHS_FINETUNE": "1",
        "BATCH_SIZE": "16",
        "OPTIONS": repr(options),
    }
    args = [
        sys.executable,
        "run.py",
        "--data-root",
        str(real_dev / "ms-coco"),
        "--run-dir",
        str(run_dir),
        "--backbones",
        "efficientnet_lite0",
    ]
    args += [x for name, value in params.items() for x in ("-p", name, value)]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # run.py streamed the epoch lines while the kernel printed them, with no kernel warning
    assert "frozen_linear  2/2" in out.stdout and "finetune  1/1" in out.stdout
    assert "WARNING" not in out.stdout + out.stderr
    for name in ("challenge.ipynb", "analysis.ipynb"):
        nb = json.loads((run_dir / name).read_text())
        texts = [
            json.dumps(o) for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]
        ]
        bad = [t[:300] for t in texts
               if "Traceback" in t or '"error"' in t or "can only test a child" in t]  # fmt: skip
        assert not bad, (name, bad)
    log = out.stdout + out.stderr
    for marker in ("Traceback", "can only test a child process", "Bad file descriptor",
                   "released too many times"):  # fmt: skip
        assert marker not in log, marker
    assert f"submission: {run_dir / 'submission.json'}" in out.stdout
    sub = json.loads((run_dir / "submission.json").read_text())
    submission.validate_submission(sub, real_dev / "ms-coco/images/test-resized")
    answers = real_dev / "test_labels.json"
    score = submission.score_submission(sub, answers)
    # the same scorer on a trivial submission (the most frequent class for every image)
    trivial = submission.score_submission({s: [0] for s in sub}, answers)
    print(
        f"\nheadless run on real photos: course F1 {score['course_f1']:.4f} "
        f"(P {score['precision']:.4f}, R {score['recall']:.4f}), macro F1 {score['macro_f1']:.4f}; "
        f"'person' everywhere: course F1 {trivial['course_f1']:.4f}"
    )
    assert score["n_images"] == 32 and score["n_missing"] == 0
    assert score["course_f1"] > trivial["course_f1"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["workers"] == 2 and config["progress"] is True and config["epochs_frozen"] == 2
    assert Path(config["data_root"]).resolve() == (real_dev / "ms-coco").resolve()
