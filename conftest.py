"""Settings for running the notebooks under nbval: smoke sizes, a throw-away run folder.

nbval starts each notebook's kernel from this process, so the kernels inherit these
variables; values already set by the caller win.
"""
import os
import tempfile
from pathlib import Path

_SMOKE_DIR = Path(os.environ.get("COCO_TEST_DIR", Path(tempfile.gettempdir()) / f"coco-nbval-{os.getpid()}"))
os.environ.setdefault("COCO_SMOKE", "1")
os.environ.setdefault("COCO_PROGRESS", "0")
os.environ.setdefault("COCO_RUN_DIR", str(_SMOKE_DIR / "run"))
os.environ.setdefault("COCO_DEMO_DIR", str(_SMOKE_DIR / "demo" / "ms-coco"))
os.environ.setdefault("MPLBACKEND", "Agg")
