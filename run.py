"""Run the challenge notebook, then the analysis notebook, headless, into a run folder.

    python run.py                      # demo data on this machine's CPU/GPU (the README's main command)
    python run.py --smoke              # tiny sizes: a one-to-two-minute check
    python run.py --data-root /home/jovyan/ms-coco --run-dir runs/real --backbones convnext_tiny

Executed copies of both notebooks are written into the run folder; the committed notebooks
are not modified. Any ``COCO_<NAME>`` variable already set in the environment is passed on.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

#: The demo run of the README: a real pretrained backbone (offline Lite0) that finishes within
#: about ten minutes on a 2-core CPU. Values already in the environment win.
DEMO_DEFAULTS = {
    "COCO_RUN_DIR": "runs/demo",
    "COCO_BACKBONES": "efficientnet_lite0",
    "COCO_DEMO_TRAIN": "2000",
    "COCO_DEMO_TEST": "400",
    "COCO_EPOCHS_FROZEN": "12",
    "COCO_EPOCHS_FINETUNE": "4",
    "COCO_IMG_SIZE": "160",
    "COCO_BATCH_SIZE": "32",
    "COCO_PROGRESS": "0",
}


def execute(notebook: Path, out: Path, timeout: int) -> float:
    """Execute ``notebook`` with the repository as working directory; save the executed copy."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(notebook, as_version=4)
    os.environ["COCO_HEADLESS"] = "1"     # the TensorBoard cell then only says where the logs are
    t0 = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="challenge-layout folder (default: course path, else demo data)")
    parser.add_argument("--run-dir", help="output folder (default: runs/demo, runs/smoke with --smoke)")
    parser.add_argument("--backbones", help="comma-separated registry names")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, same code path")
    parser.add_argument("--no-analysis", action="store_true", help="skip the analysis notebook")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)

    env = {}
    if args.smoke:
        env.update(COCO_SMOKE="1", COCO_RUN_DIR="runs/smoke", COCO_PROGRESS="0")
    elif not os.environ.get("COCO_DATA_ROOT") and not args.data_root:
        env.update(DEMO_DEFAULTS)
    if args.data_root:
        env["COCO_DATA_ROOT"] = str(Path(args.data_root).resolve())
    if args.run_dir:
        env["COCO_RUN_DIR"] = str(Path(args.run_dir).resolve())
    if args.backbones:
        env["COCO_BACKBONES"] = args.backbones
    for key, value in env.items():
        os.environ.setdefault(key, value)           # the caller's own COCO_* settings win
    run_dir = Path(os.environ.get("COCO_RUN_DIR", "runs/main"))
    run_dir = run_dir if run_dir.is_absolute() else ROOT / run_dir
    print("settings:", {k: v for k, v in sorted(os.environ.items()) if k.startswith("COCO_")}, flush=True)

    t0 = time.perf_counter()
    seconds = execute(ROOT / "challenge.ipynb", run_dir / "challenge.ipynb", args.timeout)
    print(f"challenge notebook: {seconds:.0f}s -> {run_dir / 'challenge.ipynb'}", flush=True)
    if not args.no_analysis and (ROOT / "analysis.ipynb").exists():
        seconds = execute(ROOT / "analysis.ipynb", run_dir / "analysis.ipynb", args.timeout)
        print(f"analysis notebook: {seconds:.0f}s -> {run_dir / 'analysis.ipynb'}", flush=True)
    submission = run_dir / "submission.json"
    print(f"total {time.perf_counter() - t0:.0f}s")
    print(f"submission: {submission}" if submission.exists() else "no submission was written")
    return 0 if submission.exists() else 1


if __name__ == "__main__":
    sys.exit(main())
