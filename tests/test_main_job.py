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
    env.update(COCO_VAL_FRACTION="0.25", COCO_BACKBONES="efficientnet_lite0", COCO_IMG_SIZE="96",
               COCO_EPOCHS_FROZEN="2", COCO_EPOCHS_FINETUNE="1", COCO_BATCH_SIZE="16", COCO_WORKERS="2",
               COCO_PROGRESS="1")
    out = subprocess.run([sys.executable, "run.py", "--data-root", str(real_dev / "ms-coco"),
                          "--run-dir", str(run_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # run.py streamed the sections and the epoch lines while the kernel printed them
    assert "[challenge.ipynb] 7. The epoch loop" in out.stdout and "finetune  1/1" in out.stdout
    for name in ("challenge.ipynb", "analysis.ipynb"):
        nb = json.loads((run_dir / name).read_text())
        texts = [json.dumps(o) for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
        bad = [t[:300] for t in texts if "Traceback" in t or '"error"' in t or "can only test a child" in t]
        assert not bad, (name, bad)
    log = out.stdout + out.stderr
    for marker in ("Traceback", "can only test a child process", "Bad file descriptor", "released too many times"):
        assert marker not in log, marker
    assert f"submission: {run_dir / 'submission.json'}" in out.stdout
    sub = json.loads((run_dir / "submission.json").read_text())
    submission.validate_submission(sub, real_dev / "ms-coco/images/test-resized")
    answers = real_dev / "test_labels.json"
    score = submission.score_submission(sub, answers)
    # the same scorer on a trivial submission (the most frequent class for every image)
    trivial = submission.score_submission({s: [0] for s in sub}, answers)
    print(f"\nheadless run on real photos: course F1 {score['course_f1']:.4f} "
          f"(P {score['precision']:.4f}, R {score['recall']:.4f}), macro F1 {score['macro_f1']:.4f}; "
          f"'person' everywhere: course F1 {trivial['course_f1']:.4f}")
    assert score["n_images"] == 32 and score["n_missing"] == 0
    assert score["course_f1"] > trivial["course_f1"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["workers"] == 2 and config["progress"] is True
    assert Path(config["data_root"]).resolve() == (real_dev / "ms-coco").resolve()
