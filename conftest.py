"""The notebooks' configuration under nbval: small, on generated demo data, in a throw-away folder.

nbval cannot pass parameters to a notebook, so its kernels (started from this process) read
them from ``COCO_<NAME>`` environment variables, which ``config.settings`` applies over the
parameters cell. The reference outputs nbval compares with come from this same configuration
(``tests/nbval/``, made by ``tools/nbval_references.py``): never from the real-photo run that
the committed notebooks show. Values already set by the caller win.
"""

import json
import os
import tempfile
from pathlib import Path

from cocochallenge.config import TUNABLES

_DIR = Path(tempfile.mkdtemp(prefix="coco-nbval-"))  # a fresh folder for each test session

#: Two offline backbones, so that the comparison, the ensemble and the paired intervals run;
#: tiny inputs and epochs, so that both notebooks run in about a minute on a 2-core CPU.
NBVAL = {
    "COCO_DATA_ROOT": "demo",
    "COCO_RUN_DIR": str(_DIR / "run"),
    "COCO_BACKBONES": "efficientnet_lite0,efficientnet_lite1",
    "COCO_EPOCHS_FROZEN": "2",
    "COCO_EPOCHS_FINETUNE": "1",
    "COCO_BATCH_SIZE": "32",
    "COCO_OPTIONS": json.dumps(
        {
            "img_size": 64,
            "demo_train": 240,
            "demo_test": 40,
            "demo_dir": str(_DIR / "demo" / "ms-coco"),
            "progress": False,
        }
    ),
}

for _key, _value in NBVAL.items():
    os.environ.setdefault(_key, _value)
# the kernels and subprocesses keep freed memory from their start (config.keep_freed_memory)
os.environ.setdefault("GLIBC_TUNABLES", TUNABLES)
# the start-up scan remembers image verdicts: the tests' go to a throw-away folder
os.environ.setdefault("XDG_CACHE_HOME", str(_DIR / "cache"))
os.environ.setdefault("COCO_HEADLESS", "1")
os.environ.pop("MPLBACKEND", None)  # kernels draw inline, as in a notebook
