"""The README's install commands: a hub install under the home folder that keeps the hub's
torch and survives a restart, a missing package named with the command, the extras' split."""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHISH = ("torch", "nvidia", "triton", "cuda")
#: runtime requirements that the library does not import (the kernel's and run.py's own)
NOT_IMPORTED = {"ipykernel", "ipywidgets", "papermill"}


def _hub_command() -> str:
    """The README's install command for a machine that already has its torch."""
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    found = [line for line in lines if "-c /dev/stdin" in line and "pip install" in line]
    assert len(found) == 1, found
    return found[0]


def _hub_env(home: Path, bin_dir: Path) -> dict:
    """The environment of a hub's terminal: its Python first on PATH, ``home`` as the home
    folder, no variable that would move the user site or point at another environment."""
    drop = ("PYTHONUSERBASE", "PYTHONNOUSERSITE", "PYTHONPATH", "VIRTUAL_ENV", "PIP_USER")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "HOME": str(home), "PATH": f"{bin_dir}:{env['PATH']}"}


def test_hub_install_keeps_the_torch_already_there(tmp_path):
    """In a fresh environment holding only a torch 2.5.1 (its metadata, as pip sees it), pip's
    dry run of the README's hub command installs no other torch and no CUDA libraries: only a
    torchvision made for that torch. A plain `pip install -e .` would install torch 2.14.
    (The environment sees its interpreter's packages, as a hub's does: pip's ``--user`` is
    refused in an isolated virtual environment.)"""
    env_dir = tmp_path / "hub"
    venv.create(env_dir, with_pip=True, system_site_packages=True)
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
    env = _hub_env(tmp_path / "home", bin_dir)
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


def _closure(roots) -> dict:
    """``{(name, extras): distribution}`` of ``roots`` and everything they require, extras
    included (torch's CUDA libraries come as ``cuda-toolkit[cublas,...]``), as installed here."""
    from packaging.requirements import Requirement

    seen, todo = {}, [(r, ()) for r in roots]
    while todo:
        name, extras = todo.pop()
        key = (re.sub(r"[-_.]+", "-", name).lower(), extras)
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            wanted = req.marker is None or any(
                req.marker.evaluate({"extra": e}) for e in extras or ("",)
            )
            if wanted:
                todo.append((req.name, tuple(sorted(req.extras))))
    return seen


def _listing(*folders) -> dict:
    """Every path under ``folders`` (links not followed), with the size of each file."""
    out = {}
    for folder in folders:
        for here, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = Path(here) / name
                out[str(path)] = path.lstat().st_size if name in files else "dir"
    return out


def test_readme_command_is_the_one_the_package_names():
    """The command a missing package's error names is the README's hub command."""
    from cocochallenge import INSTALL_COMMAND

    assert _hub_command() == INSTALL_COMMAND
    assert "python -m pip install --user" in INSTALL_COMMAND  # the home folder; that Python's pip


def test_hub_install_lasts_under_the_home_folder(tmp_path):
    """The hub, simulated: a base environment holding torch and torchvision (this machine's, made
    visible by links, as a hub image holds its CUDA build) and not the project; a home folder in
    a temporary directory with the checkout cloned into it; the README's command; then a fresh
    process, as after a restart of the server. The project's modules, and what pip added, import
    from under the home folder; torch is still the base environment's; no file of the base
    environment (nor of its interpreter's own packages) was added, removed or changed."""
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp_path / "probe",
         "iterative-stratification"], capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if probe.returncode:
        pytest.skip(f"no package index reachable from here: {probe.stderr.strip()[-300:]}")
    t0 = time.perf_counter()
    base, home = tmp_path / "base", tmp_path / "home"
    venv.create(base, with_pip=True, system_site_packages=True, symlinks=True)
    ask = ("import json, site, sysconfig; own = sysconfig.get_paths()['purelib']; "
           "print(json.dumps([own, [p for p in site.getsitepackages() if p != own]]))")  # fmt: skip
    site_dir, system_sites = json.loads(subprocess.run(
        [base / "bin" / "python", "-c", ask], capture_output=True, text=True, check=True
    ).stdout)  # fmt: skip
    for dist in _closure(["torch", "torchvision"]).values():
        for top in {f.parts[0] for f in dist.files or []}:
            link = Path(site_dir) / top
            if top not in ("..", "__pycache__") and not top.endswith(".pth") and not link.exists():
                link.symlink_to(dist.locate_file(top))
    clone = home / "coco-challenge"
    junk = (".git", ".venv", "runs", "data", "__pycache__", "*.egg-info", ".ruff_cache")
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(*junk))
    before = _listing(base, *system_sites)
    env = {**_hub_env(home, base / "bin"), "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc in base
    out = subprocess.run(_hub_command(), shell=True, cwd=clone, env=env, capture_output=True,
                         text=True, executable="/bin/bash", timeout=900, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    installed = time.perf_counter() - t0
    where = (
        "import json, site, cocochallenge, helpers, cpu_recipe, timm, iterstrat, torch\n"
        "mods = (cocochallenge, helpers, cpu_recipe, timm, iterstrat, torch)\n"
        "print(json.dumps({**{m.__name__: m.__file__ for m in mods}, "
        "'user_site': site.getusersitepackages()}))"
    )
    fresh = subprocess.run([base / "bin" / "python", "-c", where], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    found = {k: Path(v) for k, v in json.loads(fresh.stdout).items()}
    for name in ("cocochallenge", "helpers", "cpu_recipe"):  # the clone, in the home folder
        assert found[name].is_relative_to(clone), (name, found[name])
    user_site = found["user_site"]
    assert user_site.is_relative_to(home) and user_site.is_dir()
    for name in ("timm", "iterstrat"):  # what the hub lacked: under the home folder too
        assert found[name].is_relative_to(user_site), (name, found[name])
    assert found["torch"].is_relative_to(base)  # the hub's own torch, kept
    added = [p.name for p in user_site.iterdir() if p.name.lower().startswith(TORCHISH)]
    assert not added, added  # no second torch, torchvision or CUDA library in the home folder
    after = _listing(base, *system_sites)
    assert after == before, {
        "added": sorted(set(after) - set(before))[:10],
        "removed": sorted(set(before) - set(after))[:10],
        "changed": [p for p in before if p in after and after[p] != before[p]][:10],
    }
    print(f"\nhub install: {installed:.0f} s to the end of the README's command, "
          f"{time.perf_counter() - t0:.0f} s in all")  # fmt: skip


@pytest.mark.quick
def test_a_missing_package_is_named_with_the_install_command():
    """A Python without timm (as after a hub restart that lost it): importing the package
    fails at once with one sentence naming what is missing and the README's command."""
    code = "import sys; sys.modules['timm'] = None; import cocochallenge"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and "lacks timm," in last, last
    assert _hub_command() in last and "restart the kernel" in last


@pytest.mark.quick
def test_the_checked_imports_are_the_runtime_requirements():
    """Every runtime requirement is looked for at import (by its import name), except the
    kernel's and run.py's own; a requirement added to one list and not the other fails here."""
    from cocochallenge import REQUIRED

    names = {re.split(r"[<>=\s#\[]", line.strip())[0].lower()
             for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}  # fmt: skip
    assert set(REQUIRED.values()) == names - NOT_IMPORTED
    for module in REQUIRED:  # each import name is real (installed here)
        assert importlib.util.find_spec(module) is not None, module


@pytest.mark.quick
def test_runtime_and_development_requirements_are_apart():
    """The runtime list has no test or notebook-server tool; each needed API has a lower bound."""
    names = lambda path: {re.split(r"[<>=\s#]", line.strip())[0].lower()  # noqa: E731
                          for line in (ROOT / path).read_text().splitlines()
                          if line.strip() and not line.startswith("#")}  # fmt: skip
    runtime, dev = names("requirements.txt"), names("requirements-dev.txt")
    assert {"jupyterlab", "nbval", "pytest", "ruff"} <= dev and not dev & runtime
    # ipywidgets is the kernel's (tqdm.auto's bars of timm's downloads, commit 04df40b), not a
    # server tool: it may be a runtime requirement
    assert not {"jupyterlab", "nbval", "pytest", "ruff"} & runtime
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
