"""Constants and run-time settings: class names, environment overrides, seeds, the device.

Everything the notebooks' parameters cell needs before any data is touched lives here, so
that the other modules can stay free of global state.
"""
from __future__ import annotations

import os
import platform
import random
import subprocess
from pathlib import Path

import numpy as np
import torch

CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
NUM_CLASSES = len(CLASSES)

#: Where the course JupyterHub unzips ``ms-coco.zip``.
COURSE_DATA_ROOT = Path("/home/jovyan/ms-coco")

def _cast_like(default, text: str):
    """Cast an environment string to the type of the parameter's default value."""
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"cannot read {text!r} as a boolean (use 1/0, true/false)")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, (list, tuple)):
        return [t.strip() for t in text.split(",") if t.strip()]
    return text


def env_config(params: dict, prefix: str = "COCO_") -> dict:
    """Override notebook parameters from ``COCO_<NAME>`` environment variables.

    The notebooks keep one ``parameters`` cell (papermill can rewrite it); the environment
    wins over it so that a headless run, a test or a teammate can change a value without
    editing the notebook. Values are cast to the type of the default, so a typo fails loudly.
    """
    out = dict(params)
    for name, default in params.items():
        key = prefix + name.upper()
        if key in os.environ:
            try:
                out[name] = _cast_like(default, os.environ[key])
            except ValueError as err:
                raise ValueError(f"environment variable {key}={os.environ[key]!r}: {err}") from None
    return out


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that a rerun draws the same split, init and batches."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present; an explicit name that is not available fails clearly."""
    if name in ("", "auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available here; "
                           "use COCO_DEVICE=cpu or auto")
    return dev


def git_commit(path: Path | str = ".") -> str | None:
    """The commit of the library's checkout, so a run folder can be traced to its code."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(path), capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_report() -> dict:
    """Versions of the packages that decide a result (recorded in every run folder)."""
    import importlib.metadata as md
    pkgs = {}
    for name in ("torch", "torchvision", "timm", "numpy", "pillow", "scikit-learn", "pandas"):
        try:
            pkgs[name] = md.version(name)
        except md.PackageNotFoundError:
            pkgs[name] = None
    return {
        "library_version": _version(),
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": pkgs,
    }



def progress(iterable, enabled: bool = True, **kwargs):
    """tqdm when wanted and installed (the widget in Jupyter, text elsewhere); plain iteration otherwise.

    Not ``tqdm.auto``: its asyncio mix-in calls ``iter(iterable)`` in ``__init__``, which on a
    DataLoader with workers starts a second worker pool that is never read nor shut down; the
    widget bar's reference cycle keeps it alive until a later worker pool forks, and the
    forked children then print "can only test a child process" tracebacks when they collect it.
    """
    if not enabled:
        return iterable
    try:
        import warnings

        from tqdm import TqdmExperimentalWarning
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TqdmExperimentalWarning)
            from tqdm.autonotebook import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


#: Sizes of the smoke setting: the same code path in a minute or two on a laptop CPU.
SMOKE = {"backbones": ["efficientnet_lite0"], "epochs_frozen": 2, "epochs_finetune": 1,
         "batch_size": 32, "img_size": 128, "demo_train": 160, "demo_test": 40, "workers": 0}


#: Where smoke runs write unless told otherwise: never into a real run's folders or demo data.
SMOKE_FOLDERS = {"run_dir": "runs/smoke", "demo_dir": "data/smoke/ms-coco"}


def apply_smoke(cfg: dict, prefix: str = "COCO_") -> dict:
    """Shrink a config to the smoke sizes when ``cfg['smoke']`` is set (tests, CI, a quick look).

    The run and demo folders move to their own smoke defaults unless the environment named
    them: a smoke run must not write into ``runs/main`` nor regenerate the demo data that a
    real demo run was trained on.
    """
    if not cfg.get("smoke"):
        return cfg
    folders = {k: v for k, v in SMOKE_FOLDERS.items() if k in cfg and prefix + k.upper() not in os.environ}
    return {**cfg, **{k: v for k, v in SMOKE.items() if k in cfg}, **folders}


def notebook_config(namespace: dict) -> dict:
    """The notebook's parameters (its UPPER_CASE names) as a config dict, environment applied.

    The ``parameters`` cell stays plain assignments (papermill can rewrite it); this reads
    them, lets ``COCO_<NAME>`` variables override them and applies the smoke sizes.
    """
    params = {k.lower(): v for k, v in namespace.items()
              if k.isupper() and not k.startswith("_") and isinstance(v, (str, int, float, bool, list))}
    return apply_smoke(env_config(params))


def _version() -> str:
    from . import __version__
    return __version__


def tensorboard_binary() -> str:
    """The ``tensorboard`` program beside this kernel's Python (JupyterLab started from a venv
    without activating it has no ``.venv/bin`` on ``PATH``, and the magic would not find it)."""
    import shutil
    import sys
    beside = Path(sys.executable).parent / "tensorboard"
    return str(beside) if beside.exists() else (shutil.which("tensorboard") or "tensorboard")
