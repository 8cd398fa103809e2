"""Run-folder files: atomic writes, readable damage, one run per folder, and the check that
what is on disk matches the settings.

A crash, a kill or a full disk never leaves a half-written artifact that a later run reads; a
full disk, a read-only folder or a damaged file is said in one sentence that names the file;
reading a file of the run folder never runs code (torch files are read weights-only); two training
runs never share a folder; an artifact made with other settings is reported, never silently
reused.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import socket
import sys
import tempfile
import time
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch


class SaysWhatToDo:
    """Mixin of the errors whose message names the file and says what to do: IPython shows
    the message alone, as for :class:`analysis.RunNotFound` (a traceback would bury it), and
    ``run.py`` prints it without one (its ``SELF_EXPLAINING``)."""

    def _render_traceback_(self):
        return [f"{type(self).__name__}: {self}"]


class CannotWrite(SaysWhatToDo, OSError):
    """A run-folder file could not be written (a full disk, a read-only folder); the previous
    version of the file, if any, is kept whole."""


#: The write errors a student can fix: a full disk or quota, a folder that is not theirs.
_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_ACCESS = {errno.EACCES, errno.EPERM, errno.EROFS}


def cannot_write(path: Path | str, err: OSError) -> OSError:
    """The :class:`CannotWrite` to raise for ``err`` while writing ``path`` (other errors as they
    are): what failed, and what to do."""
    folder = Path(path).parent
    if err.errno in _SPACE:
        fix = (f"the disk is full: free some space (`df -h {folder}` shows what is left; old "
               "runs' checkpoints in runs/ are the usual bulk) or set RUN_DIR to a folder on "
               "another disk, then run again: finished epochs and models are kept")  # fmt: skip
    elif err.errno in _ACCESS:
        fix = (f"{folder} is not writable here: set RUN_DIR to a folder of your own (under your "
               "home folder), or make this one writable, then run again")  # fmt: skip
    else:
        return err
    return CannotWrite(f"cannot write {path} ({err.strerror}): {fix}")


@contextlib.contextmanager
def atomic_path(path: Path | str):
    """Yield a temporary path beside ``path``; rename it over ``path`` only when the block ends.

    ``os.replace`` is atomic on one filesystem, so readers see the old file or the new one,
    never a truncated mix. On an error the temporary file is removed and the old file kept; a
    full disk or a read-only folder is a :class:`CannotWrite` that says so.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a normal write gives the umask's
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise cannot_write(path, err) from None
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_json(obj, path: Path | str, indent: int | None = 1) -> Path:
    """Write JSON atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, default=_json_default))
    return Path(path)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class CorruptFile(SaysWhatToDo, ValueError):
    """A file of the run folder that cannot be read back (cut off, overwritten, edited)."""


def corrupt_file(path: Path | str, err: Exception | str) -> CorruptFile:
    """The :class:`CorruptFile` for ``path``: which file, why, and how the run makes it again.

    ``err`` is the error that reading it raised, or what is wrong with it in words ("is
    damaged (...): ..."). A file of one model (``models/<name>/...``) goes with the others of
    that model: the model is trained again. Any other file of the run folder the challenge
    notebook writes anew.
    """
    path = Path(path)
    if not isinstance(err, str):
        why = f"{type(err).__name__}: {str(err).split('. ')[0][:100]}"
        err = f"is damaged ({why}): it was cut off or overwritten"
    parts = path.parts
    if "models" in parts[:-2]:
        folder = Path(*parts[: parts.index("models") + 2])
        fix = (f"move the folder {folder} out of the run folder, then run the challenge notebook "
               f"again: {folder.name} is trained again")  # fmt: skip
    else:
        fix = "move it out of the run folder, then run the challenge notebook: it writes it anew"
    return CorruptFile(f"{path} {err}. To make it again, {fix}.")


def load_json(path: Path | str):
    """Read a JSON file; a damaged one is a :class:`CorruptFile` that says what to do."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError
        raise corrupt_file(path, err) from None


def load_npz(path: Path | str) -> dict:
    """Every array of an ``.npz`` file (saved scores); a damaged one is a :class:`CorruptFile`.

    A cut or a changed byte is found by zip's CRC-32 of each array, which NumPy checks."""
    import zipfile
    import zlib

    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, zlib.error, ValueError, EOFError, KeyError) as err:
        raise corrupt_file(path, err) from None


# ---- torch files: plain data, with their size and checksum --------------------------------------
#: The last line of every ``.pt`` file the project writes: the size and CRC-32 of the bytes
#: above it. torch reads past a cut (any error, or none) and past changed bytes (it does not
#: check its zip's own CRC-32s): the line names both before torch reads anything.
_MARK = b"\n-- cocochallenge: size and CRC-32 of the bytes above: "
_SUM = "%016x %08x\n"
_TAIL = len(_MARK) + len(_SUM % (0, 0))


def load_torch(path: Path | str):
    """A file :func:`torch_save_atomic` wrote, on the CPU; anything else is a :class:`CorruptFile`.

    Its size and checksum are checked first; then ``weights_only`` unpickles tensors, numbers,
    strings and plain containers only: a file of the run folder never runs code (run folders
    are copied and shared), and one that would need to is refused as damaged.
    """
    import pickle

    why = _unsummed(path)
    if why:
        raise corrupt_file(path, why)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as err:
        raise corrupt_file(path, err) from None


def _unsummed(path: Path | str) -> str | None:
    """What is wrong with ``path`` by its last line (size and CRC-32), or None."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END) - _TAIL
        fh.seek(max(size, 0))
        tail = fh.read()
        if size < 0 or not tail.startswith(_MARK):
            if tail[-22:-18] == b"PK\x05\x06":  # the end of a bare zip: torch.save's own file
                return ("was written by an earlier version of this project, in a form whose "
                        "reading could run code: it is not read")  # fmt: skip
            return "is damaged (its last line, its size and checksum, is missing): it was cut off"
        fh.seek(0)
        crc, left = 0, size
        while left > 0 and (chunk := fh.read(min(left, 1 << 24))):
            crc, left = zlib.crc32(chunk, crc), left - len(chunk)
    if tail != _MARK + (_SUM % (size, crc)).encode():
        return "is damaged (its bytes do not match their checksum): it was changed or cut off"
    return None


class _Summed:
    """The file ``torch.save`` writes into: it counts and sums the bytes, and keeps the first
    write error (a full disk) for :func:`torch_save_atomic`, which raises it once torch is
    done: an error inside torch would come out as its own "unexpected pos"."""

    def __init__(self, fh):
        self.fh, self.size, self.crc, self.error = fh, 0, 0, None

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.fh.write(data)
            except OSError as err:
                self.error = err
            self.size, self.crc = self.size + len(data), zlib.crc32(data, self.crc)
        return len(data)

    def flush(self) -> None:
        pass


def torch_save_atomic(obj, path: Path | str) -> Path:
    """``torch.save`` of plain data (:func:`_check_plain`) through a temporary file, with its
    size and checksum as last line (:func:`load_torch` checks them).

    A killed run never leaves a torn checkpoint; a full disk at any byte is a
    :class:`CannotWrite` and the previous file is kept.
    """
    _check_plain(obj)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        out = _Summed(fh)
        torch.save(obj, out)
        if out.error:
            raise out.error
        fh.write(_MARK + (_SUM % (out.size, out.crc)).encode())
    return Path(path)


def _check_plain(obj, where: str = "the object") -> None:
    """Refuse (TypeError, a bug) what ``torch.load(weights_only=True)`` would not read back:
    anything but tensors, numbers, strings, None and dicts, lists and tuples of them."""
    if isinstance(obj, torch.Tensor) or type(obj) in (bool, int, float, str, type(None)):
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            _check_plain(key, f"a key of {where}")
            _check_plain(value, f"{where}[{key!r}]")
    elif type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    else:
        raise TypeError(f"torch_save_atomic saves tensors, numbers, strings and plain "
                        f"containers only: {where} is a {type(obj).__qualname__}")  # fmt: skip


def save_npz(path: Path | str, **arrays) -> Path:
    """Compressed ``.npz`` written atomically (validation scores for the analysis notebook)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return Path(path)


class StaleRunError(SaysWhatToDo, RuntimeError):
    """The run folder holds results made with other settings or other data; nothing was trained."""


def differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every setting that differs (JSON round trip: lists, floats)."""
    import json

    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    return [
        f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def stale_message(what: str, diffs: list[str], run_dir: Path, switch: str) -> str:
    return (
        f"{what} in {run_dir} was made with other settings or data:\n  "
        + "\n  ".join(diffs)
        + f"\nNothing was trained. Either set RUN_DIR to a new folder (this one stays as it is), "
        f"or set {switch} in the parameters cell to train it again here (its old files "
        f"are moved to {run_dir / 'replaced'}/, not deleted)."
    )


#: The files that say a backbone was trained (the notebook's phases, the CPU recipe's result).
TRAINED = ("frozen_last.pt", "finetune_last.pt", "result.json")


def trained(folder: Path | str) -> bool:
    """Whether a backbone's folder (``<run>/models/<name>``) holds a trained model: an epoch's
    checkpoint or a finished result. Its ``settings.json`` and feature caches, made before the
    first epoch, are not one: a failed try's are replaced without asking."""
    return any((Path(folder) / f).exists() for f in TRAINED)


def trained_models(run_dir: Path | str) -> list[str]:
    """The backbones of ``run_dir`` that hold a trained model (:func:`trained`)."""
    models = Path(run_dir) / "models"
    return sorted(p.name for p in models.glob("*") if p.is_dir() and trained(p))


def shown_path(path: Path | str) -> str:
    """A path as a notebook should print it: relative to the working folder when inside it.

    Absolute paths of the machine a notebook ran on say nothing to its reader (and leak the
    author's home folder into a handed-in notebook).
    """
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ---- One training run per run folder ----------------------------------------------------------
#: The lock file: which process trains in the folder. Removed when that process exits; left by a
#: killed one, whose successor finds it stale and takes it over.
LOCK_NAME = "run.lock"


class RunFolderBusy(SaysWhatToDo, RuntimeError):
    """Another training run works in this run folder; nothing was written."""


def _process(pid: int) -> tuple[str, float] | None:
    """``(state, start time in seconds since the epoch)`` of a process, from Linux's /proc.

    The start time tells a process from a later one with the same id: ids start again from 1
    when a hub server restarts. None where /proc cannot say (another system, or no such id).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        with open("/proc/stat") as fh:
            boot = next(float(line.split()[1]) for line in fh if line.startswith("btime"))
        fields = stat[stat.rindex(")") + 2 :].split()  # the name in () may hold spaces
        return fields[0], boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), where /proc says (else None)."""
    info = _process(pid)
    return info and info[1]


def _this_process() -> dict:
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if "ipykernel" in program:
        program = "a notebook's kernel"
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": started(os.getpid()), "since": time.time(), "program": program}  # fmt: skip


def _gone(holder: dict) -> str | None:
    """Why the holder of a lock no longer runs; None while it does."""
    host, pid = holder.get("host"), holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return "nothing says which run wrote it"
    if host != socket.gethostname():  # the hub runs one server per team at a time
        return f"it ran on the server {host}, and this one is {socket.gethostname()}"
    if os.name == "nt":  # there os.kill would stop the process, not ask about it
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return f"no process {pid} runs on this server any more"
    except PermissionError:
        pass  # it exists, under another user
    now, started = _process(pid), holder.get("started")
    if now and now[0] == "Z":
        return f"process {pid} has ended"
    if now and started is not None and now[1] > started + 2:  # 2 s: the boot time's jitter
        return f"process {pid} is now another program, started after the lock was taken"
    return None


def _read_lock(lock: Path) -> dict | None:
    try:
        holder = json.loads(lock.read_text())
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: see _gone


def _is_me(holder: dict) -> bool:
    me = _this_process()
    return holder.get("host") == me["host"] and holder.get("pid") == me["pid"]


def _who(holder: dict) -> str:
    if not holder.get("pid"):
        return "an unreadable lock file"
    since = holder.get("since") or 0
    minutes = max(0, int(time.time() - since)) // 60
    ago = f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
    return (f"{holder.get('program', 'a run')} (process {holder.get('pid')} on "
            f"{holder.get('host')}), since {time.strftime('%Y-%m-%d %H:%M', time.localtime(since))}"
            f" ({ago} ago)")  # fmt: skip


_held: set[Path] = set()


def hold_run_folder(run_dir: Path | str, log=print, take: bool = True) -> bool:
    """Make this process the one training run of ``run_dir`` while it writes (creates the folder).

    In a notebook's kernel the hold lasts until the end of the cell that took it, so an idle
    kernel holds nothing: the analysis and the hand-in say that a run still works only while a
    cell that writes results runs. The notebook's writing cells each take it (the split and the
    check before training take it themselves). Elsewhere (a script, the CPU recipe) it lasts
    until :func:`release_run_folder` or the process's exit.

    A second training run on the folder stops here at once (:class:`RunFolderBusy`, naming
    the holder): two runs would train the same models twice and overwrite each other's files.
    The hold is this process's: calling again passes. A lock whose holder is gone (its process
    ended or was killed, its id now names a later process, or it ran on another server) is taken
    over with a note. Returns True when this call took the folder, False when this process held
    it already; with ``take=False`` only checks that the folder is free and writable
    (``run.py``, before it starts a kernel).
    """
    run_dir = Path(run_dir).expanduser()
    lock = run_dir / LOCK_NAME
    holder = _read_lock(lock)
    if holder is not None and _is_me(holder) and not _gone(holder):
        return False
    if holder is not None:
        why = _gone(holder)
        if why is None:
            unsure = f" (No such process any more? Delete {lock}.)" if os.name == "nt" else ""
            raise RunFolderBusy(
                f"{run_dir} is held by another training run: {_who(holder)}. Two runs in one "
                "folder would train the same models twice and overwrite each other's files. "
                "Wait until it ends; or stop it (in its notebook: Kernel > Interrupt Kernel; "
                f"else `kill {holder['pid']}` on {holder['host']}); or set RUN_DIR to another "
                f"folder.{unsure}"
            )
        if take:
            log(f"note: took over {run_dir} from {_who(holder)}: {why}")
    tmp = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{LOCK_NAME}.", dir=run_dir)
        with os.fdopen(fd, "w") as fh:
            json.dump(_this_process(), fh)
        if not take:
            return False  # free and writable: the run that takes it will not fail here
        if holder is not None:
            os.replace(tmp, lock)
        else:
            try:  # a hard link appears whole, and only where no lock is: one of two racing wins
                os.link(tmp, lock)
            except FileExistsError:
                return hold_run_folder(run_dir, log, take)
            except OSError:  # a filesystem without hard links: no guard against that race
                os.replace(tmp, lock)
    except OSError as err:
        raise cannot_write(lock, err) from None
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
    _release_later()
    _held.add(lock)
    return True


def _release_later() -> None:
    """Give the held folders up when the running cell ends (IPython's ``post_run_cell`` event,
    which follows every cell, failed or interrupted ones too), and at the process's exit."""
    shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    if shell is not None and _release_all not in shell.events.callbacks["post_run_cell"]:
        shell.events.register("post_run_cell", _release_all)
    atexit.unregister(_release_all)  # registered once, however many holds
    atexit.register(_release_all)


def _release_all(*_) -> None:
    for lock in list(_held):
        release_run_folder(lock.parent)


def release_run_folder(run_dir: Path | str) -> None:
    """Give the run folder up, if this process holds it (done at the cell's end or exit anyway)."""
    lock = Path(run_dir).expanduser() / LOCK_NAME
    holder = _read_lock(lock)
    if holder is not None and _is_me(holder):
        lock.unlink(missing_ok=True)
    _held.discard(lock)


def held_note(run_dir: Path | str, log=None) -> str | None:
    """The sentence to show while a training run holds ``run_dir``, else None (and to ``log``).

    The analysis and the hand-in only read the folder: they do not wait, but they say that
    what they read may still change.
    """
    holder = _read_lock(Path(run_dir).expanduser() / LOCK_NAME)
    if holder is None or _is_me(holder) or _gone(holder):
        return None
    note = (f"note: a training run still works in {run_dir}: {_who(holder)}. Its files may "
            "change: run this again when it has finished.")  # fmt: skip
    if log:
        log(note)
    return note
