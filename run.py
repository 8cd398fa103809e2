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


#: The kernel JupyterLab names "Python 3 (ipykernel)": stored as such, an opened copy is not
#: marked modified at once.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def _client_class():
    from nbclient import NotebookClient

    class TalkingClient(NotebookClient):
        """Prints each section title as its cells start, and the kernel's printed lines as they come."""

        quiet = False

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._section = None

        def _say(self, text: str) -> None:
            if not self.quiet:
                print(text, end="" if text.endswith("\n") else "\n", flush=True)

        def output(self, outs, msg, display_id, cell_index):
            if msg["msg_type"] == "stream":                       # print(), epoch lines, warnings
                self._say("    " + msg["content"]["text"].replace("\n", "\n    ").rstrip(" "))
            return super().output(outs, msg, display_id, cell_index)

    return TalkingClient


def _section_titles(nb) -> dict:
    """Index of each code cell -> the markdown heading above it (to say what runs now)."""
    titles, current = {}, None
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            heading = next((l.lstrip("#").strip() for l in cell.source.splitlines() if l.startswith("#")), None)
            current = heading or current
        else:
            titles[i] = current
    return titles


def execute(notebook: Path, out: Path, timeout: int, quiet: bool = False) -> float:
    """Execute ``notebook`` with the repository as working directory; save a signed executed copy.

    Signing marks the copy as trusted on this machine (JupyterLab then shows its styled
    tables as they were made); the kernel name is the one JupyterLab writes.
    """
    import nbformat
    from nbformat.sign import NotebookNotary
    nb = nbformat.read(notebook, as_version=4)
    nb.metadata["kernelspec"] = KERNELSPEC
    os.environ["COCO_HEADLESS"] = "1"     # the TensorBoard cell then only says where the logs are
    # OpenMP threads that wait for work sleep instead of spinning (read when the kernel imports
    # torch): on a 2-core CPU shared with loader workers the spinning doubled a fine-tuning
    # epoch's user time
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    titles, shown = _section_titles(nb), set()
    client_cls = _client_class()
    client = client_cls(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.quiet = quiet

    def on_start(cell, cell_index, **_):
        title = titles.get(cell_index)
        if title and title not in shown and not quiet:
            shown.add(title)
            print(f"[{notebook.name}] {title}", flush=True)
    client.on_cell_start = on_start
    t0 = time.perf_counter()
    try:
        client.execute()
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        nb.metadata["kernelspec"] = KERNELSPEC
        nbformat.write(nb, out)
        try:
            NotebookNotary().sign(nb)
        except Exception as err:          # a read-only Jupyter data folder: unsigned, still valid
            print(f"note: could not sign {out} as trusted ({err}); use 'Trust Notebook' in JupyterLab")
    return time.perf_counter() - t0


#: The offline recipe a CPU runs on real data when no backbone is named: measured best within
#: a 15-minute CPU budget on 678 real COCO photos (README, "The offline CPU recipe").
CPU_RECIPE = {
    "COCO_BACKBONES": "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2",
    "COCO_HEAD": "logistic",
    "COCO_EPOCHS_FROZEN": "1",
    "COCO_EPOCHS_FINETUNE": "0",
    "COCO_TTA": "0",
    "COCO_BATCH_SIZE": "32",
}


def uses_cpu_recipe(backbones: str | None, cuda: bool | None = None) -> bool:
    """Real data, no backbone named (argument or COCO_BACKBONES) and no GPU: the offline recipe."""
    if cuda is None:
        import torch
        cuda = torch.cuda.is_available()
    return not backbones and "COCO_BACKBONES" not in os.environ and not cuda


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="challenge-layout folder (default: course path, else demo data)")
    parser.add_argument("--run-dir", help="output folder (default: runs/demo, runs/smoke with --smoke)")
    parser.add_argument("--backbones", help="comma-separated registry names")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, same code path")
    parser.add_argument("--no-analysis", action="store_true", help="skip the analysis notebook")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("--quiet", action="store_true", help="print only the final lines")
    parser.add_argument("--handin", action="store_true", help="then pack the run for Moodle (see README)")
    parser.add_argument("--update-notebooks", action="store_true",
                        help="copy the executed notebooks over the committed ones (the nbval references; "
                             "only for the README's demo run)")
    args = parser.parse_args(argv)

    env = {}
    if args.smoke:
        env.update(COCO_SMOKE="1", COCO_RUN_DIR="runs/smoke", COCO_DEMO_DIR="data/smoke/ms-coco",
                   COCO_PROGRESS="0")
    elif not os.environ.get("COCO_DATA_ROOT") and not args.data_root:
        env.update(DEMO_DEFAULTS)
    if args.data_root:
        env["COCO_DATA_ROOT"] = str(Path(args.data_root).resolve())
        if uses_cpu_recipe(args.backbones):
            env.update(CPU_RECIPE)
            print("no GPU here and no backbone named: running the offline CPU recipe (frozen EfficientNet-Lite0/1/2, "
                  "logistic-regression heads, their ensemble, out-of-fold thresholds); name --backbones to "
                  "run the notebook's defaults instead", flush=True)
    if args.run_dir:
        env["COCO_RUN_DIR"] = str(Path(args.run_dir).resolve())
    if args.backbones:
        env["COCO_BACKBONES"] = args.backbones
    for key, value in env.items():
        os.environ.setdefault(key, value)           # the caller's own COCO_* settings win
    run_dir = Path(os.environ.get("COCO_RUN_DIR", "runs/main"))
    run_dir = run_dir if run_dir.is_absolute() else ROOT / run_dir
    if not args.quiet:
        print("settings:", {k: v for k, v in sorted(os.environ.items()) if k.startswith("COCO_")}, flush=True)

    t0 = time.perf_counter()
    seconds = execute(ROOT / "challenge.ipynb", run_dir / "challenge.ipynb", args.timeout, args.quiet)
    print(f"challenge notebook: {seconds:.0f}s -> {run_dir / 'challenge.ipynb'}", flush=True)
    if (run_dir / "results.csv").exists():
        import pandas as pd
        table = pd.read_csv(run_dir / "results.csv", index_col=0)
        cols = [c for c in ("f1_0.5", "f1_global", "f1_per_class", "f1_per_class_heldout", "f1_oof_halves",
                            "f1_oof_thresholds", "macro_f1_oof_thresholds", "mAP", "train_minutes") if c in table]
        print("validation scores (course F1 unless named):\n" + table[cols].round(4).to_string(), flush=True)
    if not args.no_analysis and (ROOT / "analysis.ipynb").exists():
        seconds = execute(ROOT / "analysis.ipynb", run_dir / "analysis.ipynb", args.timeout, args.quiet)
        print(f"analysis notebook: {seconds:.0f}s -> {run_dir / 'analysis.ipynb'}", flush=True)
    submission = run_dir / "submission.json"
    print(f"total {time.perf_counter() - t0:.0f}s")
    if args.update_notebooks:
        import shutil
        for name in ("challenge.ipynb", "analysis.ipynb"):
            shutil.copyfile(run_dir / name, ROOT / name)
            print(f"{name}: committed outputs replaced by this run's")
    if args.handin:
        sys.path.insert(0, str(ROOT))
        from cocochallenge.handin import pack
        pack(run_dir)
    print(f"submission: {submission}" if submission.exists() else "no submission was written")
    return 0 if submission.exists() else 1


if __name__ == "__main__":
    sys.exit(main())
