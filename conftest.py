"""Settings for running the notebooks under nbval: the README's demo run, in a throw-away folder.

nbval starts each notebook's kernel from this process, so the kernels inherit these
variables; values already set by the caller win. The configuration is the one `run.py`
uses for the committed outputs (run.DEMO_DEFAULTS), so the cells marked NBVAL_CHECK_OUTPUT
are compared with what the committed notebooks show (nbval_sanitize.cfg blanks the run
folder's name and the other volatile parts).
"""
import os
import tempfile
from pathlib import Path

from run import DEMO_DEFAULTS

_DIR = Path(os.environ.get("COCO_TEST_DIR", Path(tempfile.gettempdir()) / f"coco-nbval-{os.getpid()}"))
for _key, _value in DEMO_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
os.environ["COCO_RUN_DIR"] = os.environ.get("COCO_NBVAL_RUN_DIR", str(_DIR / "run"))
os.environ.setdefault("COCO_HEADLESS", "1")
os.environ.pop("MPLBACKEND", None)          # kernels draw inline, as in the committed run
