"""Run the challenge notebook, then the analysis notebook, headless, into a run folder.

    python run.py                      # generated demo data, the demo sizes (README)
    python run.py --smoke              # tiny sizes: a one-to-two-minute check
    python run.py --data-root /home/jovyan/ms-coco --backbones convnext_tiny -p EPOCHS_FINETUNE 4

The notebooks run through papermill: ``-p NAME VALUE`` sets any parameter of the challenge
notebook's parameters cell (the value is read as a Python literal when it is one, e.g.
``-p OPTIONS '{"img_size": 160}'``, else as text). Each executed copy is saved after every cell
as ``<run>/challenge.unfinished.ipynb`` (a killed run shows how far it got there), and replaces
``<run>/challenge.ipynb`` once the notebook has run to its end (the same for analysis.ipynb): a
run that stops early leaves the last complete run's copy as it was. Ctrl-C interrupts the
kernel; the same command then continues after the last completed epoch. The committed
notebooks are not modified. On a machine without a GPU, ``--data-root`` with no backbone named
runs the offline CPU recipe (``cpu_recipe.py``) instead of the challenge notebook, and says so.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
#: cocochallenge.config.TUNABLES, without importing torch at start-up (a test keeps them equal)
TUNABLES = "glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=18446744073709551615"

#: The demo run of the README: the offline Lite0 on generated demo data, about six minutes on
#: a 2-core CPU.
DEMO = {
    "DATA_ROOT": "demo", "RUN_DIR": "runs/demo", "BACKBONES": ["efficientnet_lite0"],
    "EPOCHS_FROZEN": 12, "EPOCHS_FINETUNE": 4, "BATCH_SIZE": 32,
    "OPTIONS": {"img_size": 160, "demo_train": 2000, "demo_test": 400},
}  # fmt: skip
#: Tiny sizes, same code path, folders of their own (never a real run's, nor its demo data).
SMOKE = {
    "DATA_ROOT": "demo", "RUN_DIR": "runs/smoke", "BACKBONES": ["efficientnet_lite0"],
    "EPOCHS_FROZEN": 2, "EPOCHS_FINETUNE": 1, "BATCH_SIZE": 32,
    "OPTIONS": {"img_size": 128, "demo_train": 160, "demo_test": 40, "workers": 0,
                "demo_dir": "data/smoke/ms-coco"},
}  # fmt: skip
#: The kernel JupyterLab names "Python 3 (ipykernel)": stored as such, an opened copy is not
#: marked modified at once.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
#: Errors whose message says what to do: printed alone, their traceback left in the notebook.
SELF_EXPLAINING = ("DataError", "StaleRunError", "SubmissionError", "WeightsUnavailable",
                   "RunFolderBusy", "CannotWrite", "CorruptFile")  # fmt: skip


def kernel_environment() -> dict:
    """Variables the notebooks' kernels start with (they inherit this process's environment)."""
    return {
        "COCO_HEADLESS": "1",  # the TensorBoard cell then only says where the logs are
        # idle OpenMP threads sleep instead of spinning: on a 2-core CPU shared with loader
        # workers the spinning doubled a fine-tuning epoch's user time
        "OMP_WAIT_POLICY": "PASSIVE",
        # glibc keeps freed memory from the kernel's first allocation on (config.keep_freed_memory)
        "GLIBC_TUNABLES": TUNABLES,
    }


def parse_value(text: str):
    """A ``-p`` value: a Python literal when it is one (3, 1e-3, True, [..], {..}), else text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


#: papermill's I/O registry picks a writer by how a path starts: the executed copies' paths
#: start with this, so that papermill saves them through :class:`AtomicSave`.
ATOMIC = "atomic:"
#: Seconds a kernel has to end its cell after Ctrl-C before it is stopped.
INTERRUPT_WAIT = 10


class AtomicSave:
    """papermill's writer of the executed copies: each save goes to a temporary file renamed
    over the copy (``files.atomic_path``), so a full disk or a kill while saving leaves the last
    good copy, and a full disk is one sentence (``files.CannotWrite``)."""

    @staticmethod
    def write(buf: str, path: str) -> None:
        from cocochallenge.files import atomic_path

        with atomic_path(path.removeprefix(ATOMIC)) as tmp:
            tmp.write_text(buf, encoding="utf-8")

    @staticmethod
    def pretty_path(path: str) -> str:
        return path.removeprefix(ATOMIC)


def execute(notebook: Path, out: Path, parameters: dict, quiet: bool = False) -> float:
    """Execute ``notebook`` with papermill into ``out``, then sign it.

    The copy is saved after every cell as ``unfinished(out)`` and replaces ``out`` only once
    the notebook has run to its end: a run that stops (a stale setting, a data error, Ctrl-C, a
    bug) leaves the last complete run's ``out`` as it was. Signing marks the copy as trusted on
    this machine: JupyterLab then shows its styled tables as they were made. The kernel's
    printed lines are passed on as they come, unless ``quiet``. Ctrl-C interrupts the kernel
    (:func:`interrupting`) and raises KeyboardInterrupt here once the kernel has stopped.
    """
    import tempfile

    import papermill
    from jupyter_client import KernelManager
    from papermill.exceptions import PapermillExecutionError

    from cocochallenge.handin import unfinished

    out, copy = Path(out).absolute(), unfinished(Path(out).absolute())
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stream = None if quiet else sys.stdout
    ran = False
    try:
        with tempfile.TemporaryDirectory() as sockets:
            # the kernel talks over local sockets, not TCP: nothing to eavesdrop, no warning.
            # papermill's client waits for the kernel's output without blocking (as nbclient's
            # own default does): a blocking one would wait for ever on a kernel that died
            km = KernelManager(
                kernel_name="python3",
                transport="ipc",
                ip=f"{sockets}/kernel",
                client_class="jupyter_client.asynchronous.AsyncKernelClient",
            )
            try:
                with interrupting(km) as pressed:
                    try:
                        papermill.execute_notebook(
                            str(notebook), atomic_output(copy), parameters=parameters,
                            cwd=str(ROOT), km=km, progress_bar=False, stdout_file=stream,
                            stderr_file=None if quiet else sys.stderr,
                        )  # fmt: skip
                    except PapermillExecutionError as err:
                        if err.ename != "KeyboardInterrupt":
                            raise
                        raise KeyboardInterrupt from None
                    except Exception:
                        if pressed:  # the kernel was stopped: it died under papermill
                            raise KeyboardInterrupt from None
                        raise
                ran = True
            finally:  # a kernel manager handed to papermill is ours to stop: asked, not killed,
                if km.has_kernel:  # its exit releases the run folder (files.hold_run_folder)
                    km.shutdown_kernel(now=False)
    finally:
        if copy.exists():
            finish(copy, out if ran else copy)
    os.replace(copy, out)  # only here, after the notebook's last cell
    return time.perf_counter() - t0


def atomic_output(path: Path) -> str:
    """The output path to hand papermill for ``path``: it then saves it with :class:`AtomicSave`."""
    from papermill.iorw import papermill_io

    if papermill_io.get_handler(ATOMIC) is not AtomicSave:
        papermill_io.register(ATOMIC, AtomicSave)
    return ATOMIC + str(path)


@contextlib.contextmanager
def interrupting(km):
    """Ctrl-C while ``km``'s kernel runs a cell interrupts the kernel, which left alone would
    run its cell to the end: its cell ends with KeyboardInterrupt and papermill saves the copy
    and stops. A kernel that has not stopped ``INTERRUPT_WAIT`` seconds later, or at a second
    Ctrl-C, is killed. Yields the list of the Ctrl-C presses so far (empty: none)."""
    pressed, stopped = [], threading.Event()

    def kill_later():
        if not stopped.wait(INTERRUPT_WAIT):
            km.signal_kernel(signal.SIGKILL)

    def on_sigint(signum, frame):
        if not km.has_kernel:
            raise KeyboardInterrupt
        pressed.append(signum)
        if len(pressed) > 1:
            km.signal_kernel(signal.SIGKILL)
            return
        print("\nCtrl-C: interrupting the kernel (Ctrl-C again stops it at once)", flush=True)
        km.interrupt_kernel()
        threading.Thread(target=kill_later, daemon=True).start()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield pressed
    finally:
        stopped.set()
        signal.signal(signal.SIGINT, previous)


def finish(copy: Path, shown: Path) -> None:
    """The executed ``copy`` made readable: JupyterLab's kernel name, no machine's folders in
    its metadata (``shown``: where it will be), text outputs as a terminal shows them; saved
    atomically, then signed as trusted."""
    import nbformat
    from nbformat.sign import NotebookNotary

    from cocochallenge.files import atomic_path

    nb = nbformat.read(copy, as_version=4)
    nb.metadata["kernelspec"] = KERNELSPEC
    paths = nb.metadata.get("papermill", {})
    if paths.get("input_path"):
        paths["input_path"] = os.path.relpath(paths["input_path"], ROOT)
    paths["output_path"] = os.path.relpath(shown, ROOT)
    tidy_outputs(nb)
    with atomic_path(copy) as tmp:
        nbformat.write(nb, tmp)
    try:
        NotebookNotary().sign(nb)
    except Exception as err:  # a read-only Jupyter data folder: unsigned, still valid
        print(f"note: could not sign {shown} as trusted ({err})")


def stopped_at(copy: Path) -> str:
    """Where the run saved in ``copy`` stopped: its last started cell, and that cell's section."""
    import nbformat

    try:
        cells = nbformat.read(copy, as_version=4).cells
    except Exception:  # nothing saved yet, or the disk filled up while saving
        return "before its first cell"
    started = [i for i, c in enumerate(cells) if c.metadata.get("papermill", {}).get("start_time")]
    if not started:
        return "before its first cell"
    headings = [c.source.splitlines()[0].lstrip("# ") for c in cells[: started[-1]]
                if c.cell_type == "markdown" and c.source.startswith("#")]  # fmt: skip
    where = f"cell {cells[started[-1]].get('execution_count') or '(not started)'}"
    return where + (f' (section "{headings[-1]}")' if headings else "")


def tidy_outputs(nb) -> None:
    """Each cell's printed text as a terminal shows it: consecutive stream outputs joined, and
    progress bars (redrawn with carriage returns, cleared when done) resolved to what is left on
    screen, so a saved notebook holds the epoch lines, not thousands of bar frames."""
    for cell in [c for c in nb.cells if c.cell_type == "code"]:
        merged = []
        for out in cell.get("outputs", []):
            same = merged and out.get("output_type") == "stream" == merged[-1].get("output_type")
            if same and out.get("name") == merged[-1].get("name"):
                merged[-1]["text"] += out["text"]
            else:
                merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream" and "\r" in out["text"]:
                lines = out["text"].split("\n")  # not splitlines: it also splits at "\r"
                out["text"] = "\n".join(_overprint(line) for line in lines)
        cell["outputs"] = [o for o in merged if o.get("output_type") != "stream" or o["text"]]


def _overprint(line: str) -> str:
    """One line as a terminal leaves it: each carriage return writes over its start."""
    shown = ""
    for part in line.split("\r"):
        shown = part + shown[len(part) :]
    return shown.rstrip() if "\r" in line else line


def without_injected_cell(path: Path) -> None:
    """Remove papermill's injected-parameters cell: in a committed notebook it would sit under
    the parameters cell and override a student's edit of it. The execution counts are then
    numbered again, so that the notebook reads as the one run top to bottom it was (1..n: the
    hand-in's check), not with the removed cell's number missing."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    ran = [c for c in nb.cells if c.cell_type == "code" and c.execution_count is not None]
    for count, cell in enumerate(ran, 1):
        cell.execution_count = count
        for out in cell.outputs:
            if out.get("output_type") == "execute_result":
                out["execution_count"] = count
    nbformat.write(nb, path)


def uses_cpu_recipe(args, cuda: bool | None = None) -> bool:
    """Real data, no backbone named (``--backbones`` or ``-p BACKBONES``) and no GPU."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    named = args.backbones or any(name == "BACKBONES" for name, _ in args.parameter)
    return args.data_root not in (None, "demo") and not named and not cuda and not args.smoke


def parameters_of(args) -> dict:
    """The challenge notebook's parameters for this command line (papermill's ``parameters``)."""
    demo = args.data_root in (None, "demo")  # demo data only when asked for, or by default
    params = dict(SMOKE if args.smoke else DEMO if demo else {})
    if not demo:
        path = resolved(Path(args.data_root).expanduser(), "--data-root", args.data_root)
        params["DATA_ROOT"] = from_root(path, args.data_root)
        params.setdefault("RUN_DIR", "runs/main")
    if args.backbones:
        params["BACKBONES"] = [b.strip() for b in args.backbones.split(",") if b.strip()]
    for name, value in args.parameter:
        params[name] = parse_value(value)
    if args.run_dir:
        params["RUN_DIR"] = args.run_dir
    option = "--run-dir" if args.run_dir else "RUN_DIR"
    path = resolved(ROOT / params["RUN_DIR"], option, params["RUN_DIR"])
    params["RUN_DIR"] = from_root(path, params["RUN_DIR"])
    return params


class LinkLoop(ValueError):
    """A folder given on the command line is a loop of symbolic links."""


def resolved(path: Path, option: str, typed: str) -> Path:
    """``path.resolve()``; a loop of symbolic links is a :class:`LinkLoop` naming ``option``."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # "Symlink loop from ..." (OSError ELOOP from Python 3.13)
        raise LinkLoop(
            f"{option} {typed} is a loop of symbolic links (a link that leads back to itself; "
            f"`ls -l {typed}` shows where it points): give the folder itself, or fix the link"
        ) from None


def from_root(path: Path, typed: str) -> str:
    """``path`` for the kernels, which start in the repository: relative to it when ``typed``
    was relative (the executed notebooks then show no machine's folders), else absolute."""
    return os.path.relpath(path, ROOT) if not Path(typed).expanduser().is_absolute() else str(path)


def kept(out: Path) -> str:
    """Said after a stopped run's copy: the last complete run's copy, where there is one."""
    return f"; {out} is still the last complete run's" if out.exists() else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", help="challenge-layout folder (default or demo: demo data)")
    parser.add_argument("--run-dir", help="output folder (default: runs/demo, runs/main, ...)")
    parser.add_argument("--backbones", help="comma-separated registry names")
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a parameter of challenge.ipynb",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, same code path")
    parser.add_argument("--no-analysis", action="store_true", help="skip the analysis notebook")
    parser.add_argument("--quiet", action="store_true", help="print only the final lines")
    parser.add_argument("--handin", action="store_true", help="then pack the run for Moodle")
    parser.add_argument(
        "--update-notebooks",
        action="store_true",
        help="copy the executed notebooks over the committed ones",
    )
    args = parser.parse_args(argv)
    if args.data_root is not None and not args.data_root.strip():  # an empty shell variable
        parser.error(
            "--data-root is empty: give the unzipped ms-coco folder, or leave --data-root out "
            "(or give --data-root demo) for generated demo data"
        )
    try:
        params = parameters_of(args)
    except LinkLoop as err:
        parser.error(str(err))
    os.chdir(ROOT)  # the paths in params are the kernels', which start here
    run_dir = Path(params["RUN_DIR"])
    stray = sorted(k for k in os.environ if k.startswith("COCO_") and k != "COCO_HEADLESS")
    if stray:  # the tests' way to set parameters; here papermill's -p is the one way
        print(f"note: ignoring {', '.join(stray)}: set parameters with -p NAME VALUE", flush=True)
        for key in stray:
            del os.environ[key]
    os.environ.update(kernel_environment())
    from cocochallenge.config import keep_freed_memory

    keep_freed_memory()  # the CPU recipe runs in this process
    if not args.quiet:
        print("parameters:", params, flush=True)

    from papermill.exceptions import PapermillExecutionError

    from cocochallenge.handin import unfinished

    t0, running = time.perf_counter(), None
    try:
        from cocochallenge.files import hold_run_folder

        hold_run_folder(run_dir, take=False)  # another run there: stop before starting a kernel
        if uses_cpu_recipe(args):
            import cpu_recipe

            print("no GPU here and no backbone named: the offline CPU recipe (cpu_recipe.py: "
                  "frozen EfficientNet-Lite0/1/2 at their own size and at 384 px, logistic "
                  "heads, their ensemble, out-of-fold thresholds), not the challenge "
                  "notebook; name --backbones to run the notebook", flush=True)  # fmt: skip
            running = "the CPU recipe"
            cpu_recipe.run(params["DATA_ROOT"], run_dir, seed=params.get("SEED", 0))
        else:
            running = out = run_dir / "challenge.ipynb"
            seconds = execute(ROOT / "challenge.ipynb", out, params, args.quiet)
            print(f"challenge notebook: {seconds:.0f}s -> {out}", flush=True)
        if not args.no_analysis:
            running = out = run_dir / "analysis.ipynb"
            seconds = execute(
                ROOT / "analysis.ipynb", out, {"RUN_DIR": params["RUN_DIR"]}, args.quiet
            )
            print(f"analysis notebook: {seconds:.0f}s -> {out}", flush=True)
    except KeyboardInterrupt:
        if running == "the CPU recipe":
            said = (
                "in the CPU recipe. Run the same command again: the networks it fitted are reused."
            )
        elif running:
            said = (f"in {running.name}, {stopped_at(unfinished(running))}; its executed copy "
                    f"up to there: {unfinished(running)}{kept(running)}. Run the same command "
                    "again: it continues after the last completed epoch.")  # fmt: skip
        else:
            said = "before anything ran."
        print(f"\nstopped (Ctrl-C) {said}", file=sys.stderr)
        return 130
    except PapermillExecutionError as err:
        print(f"\n{err.ename}: {err.evalue}", file=sys.stderr)
        if err.ename not in SELF_EXPLAINING:
            print("".join(err.traceback[-3:]), file=sys.stderr)
        print(f"(the full traceback is in {unfinished(running)}{kept(running)})", file=sys.stderr)
        return 1
    except Exception as err:  # the CPU recipe runs here, not in a kernel; a full disk
        if type(err).__name__ not in SELF_EXPLAINING:
            raise
        print(f"\n{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"total {time.perf_counter() - t0:.0f}s")
    if args.update_notebooks:
        import shutil

        for name in ("challenge.ipynb", "analysis.ipynb"):
            shutil.copyfile(run_dir / name, ROOT / name)
            without_injected_cell(ROOT / name)
            print(f"{name}: committed outputs replaced by this run's")
    if args.handin:
        from cocochallenge.handin import pack

        pack(run_dir)
    submission = run_dir / "submission.json"
    print(f"submission: {submission}" if submission.exists() else "no submission was written")
    return 0 if submission.exists() else 1


if __name__ == "__main__":
    if sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:
        # glibc reads its tunables only when a process starts: start again with them. One run
        # of the CPU recipe each (real photos): 4:37 and 13.6 M page faults, against 5:13 and
        # 22.5 M with mallopt in the running process (config.keep_freed_memory)
        os.environ["GLIBC_TUNABLES"] = kernel_environment()["GLIBC_TUNABLES"]
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.exit(main())
