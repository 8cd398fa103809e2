"""The README's install commands: the hub's torch is never replaced, the split of the extras."""

import json
import os
import re
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHISH = ("torch", "nvidia", "triton", "cuda")


def _hub_command() -> str:
    """The README's install command for a machine that already has its torch."""
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    found = [line for line in lines if "-c /dev/stdin" in line and "pip install" in line]
    assert len(found) == 1, found
    return found[0]


def test_hub_install_keeps_the_torch_already_there(tmp_path):
    """In a fresh environment holding only a torch 2.5.1 (its metadata, as pip sees it), pip's
    dry run of the README's hub command installs no other torch and no CUDA libraries: only a
    torchvision made for that torch. A plain `pip install -e .` would install torch 2.14."""
    env_dir = tmp_path / "hub"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    where = "import site; print(site.getsitepackages()[0])"
    site = subprocess.run([bin_dir / "python", "-c", where], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip
    meta = Path(site) / "torch-2.5.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.5.1\n")
    (meta / "RECORD").write_text("")
    report = tmp_path / "report.json"
    command = _hub_command().replace("pip install", f"pip install --dry-run -q --report {report}")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True,
                         executable="/bin/bash", timeout=600, check=False)  # fmt: skip
    if out.returncode and "Could not fetch" in out.stderr + out.stdout:
        pytest.skip("no package index reachable from here")
    assert out.returncode == 0, out.stderr[-2000:]
    planned = {i["metadata"]["name"].lower(): i["metadata"]["version"]
               for i in json.loads(report.read_text())["install"]}  # fmt: skip
    torchish = {n: v for n, v in planned.items() if n.startswith(TORCHISH)}
    assert set(torchish) == {"torchvision"}, torchish
    assert torchish["torchvision"].startswith("0.20."), torchish  # the one made for torch 2.5


@pytest.mark.quick
def test_runtime_and_development_requirements_are_apart():
    """The runtime list has no test or notebook-server tool; each needed API has a lower bound."""
    names = lambda path: {re.split(r"[<>=\s#]", line.strip())[0].lower()  # noqa: E731
                          for line in (ROOT / path).read_text().splitlines()
                          if line.strip() and not line.startswith("#")}  # fmt: skip
    runtime, dev = names("requirements.txt"), names("requirements-dev.txt")
    assert {"jupyterlab", "nbval", "pytest", "ruff"} <= dev and not dev & runtime
    assert not {"jupyterlab", "ipywidgets", "nbval", "pytest", "ruff"} & runtime
    text = (ROOT / "requirements.txt").read_text()
    for bound in ("torch>=", "torchvision>=", "timm>=1.0.31", "papermill>="):
        assert bound in text, bound
    project = (ROOT / "pyproject.toml").read_text()  # the one list each, read by pyproject
    assert 'dependencies = { file = ["requirements.txt"] }' in project
    assert 'optional-dependencies.dev = { file = ["requirements-dev.txt"] }' in project


@pytest.mark.quick
def test_the_course_data_is_never_used_unless_named(tmp_path, monkeypatch):
    """A decoy at the path the code treats as the course's: the demo configuration of run.py
    and of the tests, and the notebook's "demo" root, never read it."""
    import run
    from cocochallenge import config, data

    decoy = tmp_path / "ms-coco"
    for sub in ("images/train-resized", "labels/train", "images/test-resized"):
        (decoy / sub).mkdir(parents=True)
        (decoy / sub / "000000000001.jpg").write_bytes(b"decoy")
    monkeypatch.setattr(config, "COURSE_DATA_ROOT", decoy)
    monkeypatch.setattr(data, "COURSE_DATA_ROOT", decoy)
    root, is_demo = data.resolve_data_root("demo", tmp_path / "demo", 12, 4)
    assert is_demo and root == tmp_path / "demo"
    args = run.main.__globals__["argparse"].Namespace(
        smoke=False, data_root=None, backbones=None, parameter=[], run_dir=None
    )
    assert run.parameters_of(args)["DATA_ROOT"] == "demo"
    import importlib.util

    spec = importlib.util.spec_from_file_location("nbval_config", ROOT / "conftest.py")
    nbval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nbval)
    assert nbval.NBVAL["COCO_DATA_ROOT"] == "demo"
    with pytest.raises(data.DataError, match="DATA_ROOT is empty"):
        data.resolve_data_root("", tmp_path / "demo")
    assert sorted(p.name for p in decoy.iterdir()) == ["images", "labels"]  # untouched
