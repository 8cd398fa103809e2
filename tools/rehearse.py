"""A rehearsal at the course's size on this machine: every stage timed, its peak memory measured.

    python tools/rehearse.py --out /tmp/rehearsal                          # 65,000 + 4,952 images
    python tools/rehearse.py --out /tmp/rehearsal --n-train 2000 --n-test 200   # a quick check
    python tools/rehearse.py --out /tmp/rehearsal --build-only             # the data alone

1. **Data.** The course's sizes (65,000 labelled, 4,952 test images by default) are built from
   the real photos of ``../shared/real-coco-train`` as hard links under new 12-digit ids, each
   with a copy of its photo's ``.cls`` file (copies of the photos only where hard links fail,
   and it says so). The photos repeat about a hundred times each: **this data measures time,
   memory and disk, never accuracy** (validation scores on it are meaningless). It is written
   to ``<out>/ms-coco``, outside the repository, and reused by a later rehearsal of the same
   sizes (``<out>/data-manifest.json``). Test ids follow the training ids: no collision.
2. **The run.** ``run.py`` runs the committed notebooks on it, as a team would: the data check
   (its remembered verdicts are forgotten first, so the scan is a first run's), the split,
   the feature caches, the frozen head, fine-tuning, thresholds, the test pass, the submission,
   the analysis notebook; then ``python -m cocochallenge handin``. One small network at a small
   input size and short phases by default (``--backbones``, ``-p NAME VALUE`` as for run.py).
   The run folder, ``<out>/run``, starts empty each time: nothing is resumed.
3. **The measurements.** Each stage's time and peak memory: the data building, each
   ``## N. Title`` section of both notebooks (from the cell times papermill writes into the
   executed notebooks), the training cell's parts per backbone (features, frozen head,
   fine-tuning, validation and test scores: from the times its files were written), run.py's
   own time between cells (kernel start-ups, saving) and the hand-in. A thread samples the
   memory of this process and all its descendants (run.py, the kernels, their loader and scan
   workers) every half second from ``/proc``: the sum of their resident sets (RSS, which
   counts shared pages once per process, so it overstates) and of their proportional sets
   (PSS, shared pages split between their users: the machine's real use). Elsewhere than on
   Linux there is no ``/proc``: times only. Written to ``<out>``: ``rehearsal.json``
   (everything), ``stages.csv``, ``memory.csv`` (the samples), ``run.log``.

What it does not rehearse: reading 65,000 distinct files from disk (the hard links are 678
photos, in the page cache after the first pass), and any GPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "real-coco-train"  # 678 labelled real photos (DESIGN.md)
#: The rehearsal's ids start here: 12 digits, far above real COCO ids (below 600,000).
FIRST_ID = 900_000_000_000
MANIFEST = "data-manifest.json"
#: What the rehearsal runs unless told otherwise: one small offline network, small inputs,
#: short phases (``-p`` of the same name replaces one).
DEFAULT_PARAMETERS = {"OPTIONS": '{"img_size": 96}', "EPOCHS_FROZEN": "3", "EPOCHS_FINETUNE": "1"}
NOT_FOR_ACCURACY = (
    "rehearsal data: a few hundred real photos repeated under new ids; it measures time, memory "
    "and disk, never accuracy"
)


# --- the data ---------------------------------------------------------------------------------


def new_id(i: int) -> str:
    return f"{FIRST_ID + i:012d}"


def source_photos(src: Path) -> tuple[list[str], list[str]]:
    """``(labelled, test)`` stems of a challenge folder, sorted; labelled ones have an image."""
    images = {p.stem for p in (src / "images" / "train-resized").glob("*.jpg")}
    labelled = sorted(p.stem for p in (src / "labels" / "train").glob("*.cls") if p.stem in images)
    test = sorted(p.stem for p in (src / "images" / "test-resized").glob("*.jpg"))
    if not labelled:
        raise SystemExit(f"no labelled photos in {src} (images/train-resized, labels/train)")
    return labelled, test


def _count(folder: Path, suffix: str) -> int:
    with os.scandir(folder) as it:
        return sum(1 for e in it if e.name.endswith(suffix))


def build_data(src: Path, out: Path, n_train: int, n_test: int, log=print) -> dict:
    """The challenge layout at the given sizes under ``out/ms-coco``; its manifest.

    Labelled image ``i`` is a hard link to labelled photo ``i mod 678`` (its labels a copy of
    that photo's); test image ``j`` links to photo ``j mod n`` of the source's test photos
    followed by its labelled ones (more shapes than 32 test photos alone). A folder built with
    the same source and sizes, whose file counts still match, is reused as it is.
    """
    src, out = Path(src).resolve(), Path(out).resolve()
    if out == ROOT or ROOT in out.parents:
        raise SystemExit(f"{out} is inside the repository: the rehearsal's data goes outside it")
    data, manifest_path = out / "ms-coco", out / MANIFEST
    want = {"source": str(src), "n_train": n_train, "n_test": n_test}
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if {k: old.get(k) for k in want} == want and _counts(data) == (n_train, n_train, n_test):
            log(f"data: reusing {data} ({n_train} labelled, {n_test} test, {old['method']})")
            return {**old, "reused": True}
    elif data.exists():
        raise SystemExit(f"{data} exists and is not a rehearsal's (no {MANIFEST}): choose --out")
    labelled, test = source_photos(src)
    pool = [("test-resized", s) for s in test] + [("train-resized", s) for s in labelled]
    labels = {s: (src / "labels" / "train" / f"{s}.cls").read_bytes() for s in labelled}
    partial = out / "ms-coco.partial"
    shutil.rmtree(partial, ignore_errors=True)
    folders = [partial / "images" / "train-resized", partial / "labels" / "train"]
    folders.append(partial / "images" / "test-resized")
    for folder in folders:
        folder.mkdir(parents=True)
    t0, method = time.perf_counter(), "hard links"
    for i in range(n_train):
        stem = labelled[i % len(labelled)]
        photo = src / "images" / "train-resized" / f"{stem}.jpg"
        method = _place(photo, folders[0] / f"{new_id(i)}.jpg", method, log)
        (folders[1] / f"{new_id(i)}.cls").write_bytes(labels[stem])
    for j in range(n_test):
        sub, stem = pool[j % len(pool)]
        photo = src / "images" / sub / f"{stem}.jpg"
        method = _place(photo, folders[2] / f"{new_id(n_train + j)}.jpg", method, log)
    manifest_path.unlink(missing_ok=True)  # a half-replaced folder is never taken for a whole one
    shutil.rmtree(data, ignore_errors=True)  # the previous rehearsal's (its manifest said so)
    partial.rename(data)
    manifest = {
        **want,
        "method": method,
        "first_id": new_id(0),
        "labelled_photos": len(labelled),
        "test_pool": len(pool),
        "note": NOT_FOR_ACCURACY,
    }
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    log(
        f"data: {n_train} labelled and {n_test} test images as {method} of {len(labelled)} "
        f"photos in {data} ({time.perf_counter() - t0:.0f} s); {NOT_FOR_ACCURACY}"
    )
    return {**manifest, "reused": False}


def _counts(data: Path) -> tuple[int, int, int] | None:
    try:
        return (
            _count(data / "images" / "train-resized", ".jpg"),
            _count(data / "labels" / "train", ".cls"),
            _count(data / "images" / "test-resized", ".jpg"),
        )
    except OSError:
        return None


def _place(src: Path, dst: Path, method: str, log) -> str:
    """A hard link of ``src`` at ``dst``, or a copy once links have failed (said once)."""
    if method == "hard links":
        try:
            os.link(src, dst)
            return method
        except OSError as err:  # another file system, or too many links to one photo
            log(f"data: hard links failed ({err}): copying the photos instead")
    shutil.copyfile(src, dst)
    return "copies"


# --- memory ----------------------------------------------------------------------------------


def _kb(path: str, field: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:  # the process ended meanwhile, or smaps is not readable
        pass
    return 0


def tree_memory(root: int) -> tuple[int, int, int]:
    """``(rss_kb, pss_kb, processes)`` summed over ``root`` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    rss = pss = 0
    todo, seen = [root], 0
    while todo:
        pid = todo.pop()
        seen += 1
        rss += _kb(f"/proc/{pid}/status", "VmRSS:")
        pss += _kb(f"/proc/{pid}/smaps_rollup", "Pss:")
        todo.extend(children.get(pid, []))
    return rss, pss, seen


class Sampler(threading.Thread):
    """Samples ``(time, rss_kb, pss_kb, processes)`` of this process's tree every ``every`` s."""

    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.samples, self._done = every, [], threading.Event()
        self.works = os.path.isdir("/proc/self")

    def run(self):
        while self.works and not self._done.is_set():
            self.samples.append((time.time(), *tree_memory(os.getpid())))
            self._done.wait(self.every)

    def stop(self):
        self._done.set()
        self.join()


# --- the stage table -------------------------------------------------------------------------


def _when(text: str | None) -> float | None:
    """papermill's ISO time (UTC) as seconds since the epoch."""
    if not text:
        return None
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def notebook_cells(nb: dict, label: str) -> list[dict]:
    """The executed code cells of a notebook, each with its ``## `` section and its times."""
    rows, section = [], "(before the first section)"
    for index, cell in enumerate(nb["cells"]):
        source = "".join(cell.get("source", ""))
        if cell["cell_type"] == "markdown":
            heading = next((line for line in source.splitlines() if line.startswith("## ")), None)
            section = heading[3:].strip() if heading else section
            continue
        times = cell.get("metadata", {}).get("papermill", {})
        start, end = _when(times.get("start_time")), _when(times.get("end_time"))
        if cell["cell_type"] != "code" or start is None or end is None:
            continue
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        first = next((line for line in source.splitlines() if line.strip()), "")
        rows.append(
            {
                "stage": f"{label}: {section}",
                "cell": index,
                "start": start,
                "end": end,
                "seconds": end - start,
                "first_line": first[:70],
                "error": f"{errors[0]['ename']}: {errors[0]['evalue']}" if errors else "",
            }
        )
    return rows


def sections(cells: list[dict]) -> list[dict]:
    """Stages from cells, in order: each section's window from its first start to its last end."""
    stages: dict[str, dict] = {}
    for row in cells:
        stage = stages.setdefault(row["stage"], {"stage": row["stage"], "start": row["start"]})
        stage["end"] = max(stage.get("end", row["end"]), row["end"])
    return [{**s, "seconds": s["end"] - s["start"], "notebook": True} for s in stages.values()]


#: The files a backbone writes as the training cell goes: each one ends a part of it.
MILESTONES = (
    ("features", "features_val.pt"),
    ("frozen head", "frozen_last.pt"),
    ("fine-tuning", "finetune_last.pt"),
    ("validation and test scores", "result.json"),
)


def training_parts(run_dir: Path) -> list[dict]:
    """The training cell in parts, per backbone, from the times its files were last written.

    A cell is papermill's smallest timed unit, and one cell trains every backbone; the files
    it leaves say when each part ended (the checkpoints are rewritten every epoch). A part
    starts where the one before ended; a backbone's first, when its ``settings.json`` was
    written, or the previous backbone finished, whichever is later.
    """
    parts, end = [], 0.0
    folders = [f for f in Path(run_dir).glob("models/*") if (f / "settings.json").is_file()]
    for folder in sorted(folders, key=lambda f: min(_mtimes(f).values(), default=0)):
        times = _mtimes(folder)
        start = max(times.get("settings.json", end), end)
        for part, name in MILESTONES:
            if name in times and times[name] >= start:
                parts.append({"stage": f"{folder.name}: {part}", "start": start,
                              "end": times[name], "seconds": times[name] - start})  # fmt: skip
                start = end = times[name]
    return parts


def _mtimes(folder: Path) -> dict[str, float]:
    names = ["settings.json", *(name for _, name in MILESTONES)]
    return {n: (folder / n).stat().st_mtime for n in names if (folder / n).is_file()}


def peaks(stages: list[dict], samples: list[tuple], skip: list[dict] = ()) -> list[dict]:
    """Each stage with the largest RSS and PSS sums (MB) of the samples within its window.

    Samples within a window of ``skip`` are left out (run.py's own time is the rest of its
    window). A stage with no sample (shorter than the interval) has no figure: None.
    """
    out = []
    for stage in stages:
        inside = [
            s
            for s in samples
            if stage["start"] <= s[0] <= stage["end"]
            and not any(k["start"] <= s[0] <= k["end"] for k in skip)
        ]
        rss, pss = (max(s[i] for s in inside) / 1024 if inside else None for i in (1, 2))
        out.append({**stage, "peak_rss_mb": rss, "peak_pss_mb": pss})
    return out


def table(stages: list[dict], memory: bool) -> str:
    """The stage table as printed: parts indented under their section; '-': no sample."""
    width = max(len(s["stage"]) + 4 for s in stages)
    keys = ("peak_rss_mb", "peak_pss_mb") if memory else ()
    lines = [f"{'stage':<{width}}  {'time s':>8}" + "  peak RSS MB  peak PSS MB" * memory]
    for s in stages:
        mem = "".join(f"  {'-':>11}" if s[k] is None else f"  {s[k]:>11.0f}" for k in keys)
        name = ("    " if s.get("part") else "") + s["stage"]
        lines.append(f"{name:<{width}}  {s['seconds']:>8.1f}{mem}")
    return "\n".join(lines)


# --- disk ------------------------------------------------------------------------------------


def kind_of(name: str) -> str:
    if name.startswith("features_") and name.endswith(".pt"):
        return "feature caches"
    if name.endswith(".pt"):
        return "checkpoints"
    if "tfevents" in name:
        return "TensorBoard logs"
    return "hand-in zip" if name == "handin.zip" else "other"


def disk_usage(folder: Path, linked_too: bool = True) -> dict[str, float]:
    """MB on disk under ``folder``, in all and by kind (an inode counted once, however linked).

    ``linked_too=False`` leaves out files with other links (the rehearsal's photos, whose
    blocks are the source's): what the folder adds to the disk.
    """
    usage, seen = {"total": 0.0}, set()
    for path in Path(folder).rglob("*"):
        st = path.lstat()
        if (st.st_dev, st.st_ino) in seen or (not linked_too and st.st_nlink > 1):
            continue
        seen.add((st.st_dev, st.st_ino))
        mb = st.st_blocks * 512 / 2**20
        kind = kind_of(path.name) if path.is_file() else "other"
        usage["total"] += mb
        usage[kind] = usage.get(kind, 0.0) + mb
    return usage


# --- the run ---------------------------------------------------------------------------------


def stream(cmd: list[str], log: Path, quiet: bool) -> tuple[int, float, float]:
    """``(exit code, start, end)`` of ``cmd`` run in the repository, its output into ``log``
    (and here unless ``quiet``)."""
    start = time.time()
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        while chunk := os.read(proc.stdout.fileno(), 65536):
            fh.write(chunk)
            if not quiet:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        proc.wait()
    return proc.returncode, start, time.time()


def forget_scan(data: Path) -> None:
    """Delete the data check's remembered verdicts for the rehearsal's folder (only those)."""
    code = "import sys; from cocochallenge.scan import cache_file; print(cache_file(sys.argv[1]))"
    where = subprocess.run([sys.executable, "-c", code, str(data)], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    Path(where).unlink(missing_ok=True)


def rehearse(out: Path, args) -> tuple[dict, list[dict], list[dict]]:
    """Run run.py, then the hand-in, on ``out/ms-coco``: ``(exit codes, stages, cells)``."""
    data, run_dir, log = out / "ms-coco", out / "run", out / "run.log"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: nothing resumed, every stage timed
    log.unlink(missing_ok=True)
    if not args.warm_scan:
        forget_scan(data)
    cmd = [sys.executable, "run.py", "--data-root", str(data), "--run-dir", str(run_dir)]
    cmd += ["--backbones", args.backbones]
    for name, value in {**DEFAULT_PARAMETERS, **dict(args.parameter)}.items():
        cmd += ["-p", name, value]
    print(f"rehearsal: {' '.join(cmd[1:])}", flush=True)
    codes = {"command": cmd}
    codes["run.py"], start, end = stream(cmd, log, args.quiet)
    cells = []
    for label in ("challenge", "analysis"):
        path = run_dir / f"{label}.ipynb"
        if not path.is_file():  # a run that stopped: its copy up to there (run.py)
            path = run_dir / f"{label}.unfinished.ipynb"
        if path.is_file():
            cells += notebook_cells(json.loads(path.read_text()), label)
    stages = sections(cells)
    between = {
        "stage": "run.py between cells (kernel start-ups, saving)",
        "start": start,
        "end": end,
        "seconds": end - start - sum(s["seconds"] for s in stages),
        "between": True,
    }
    stages.append(between)
    for part in reversed(training_parts(run_dir)):
        at = next((i for i, s in enumerate(stages) if s["start"] <= part["end"] <= s["end"]), -1)
        stages.insert(at + 1, {**part, "part": True})
    codes["hand-in"] = None
    if (run_dir / "submission.json").is_file():
        cmd = [sys.executable, "-m", "cocochallenge", "handin", str(run_dir)]
        codes["hand-in"], h0, h1 = stream(cmd, log, args.quiet)
        stages.append({"stage": "hand-in", "start": h0, "end": h1, "seconds": h1 - h0})
    return codes, stages, cells


def report(out: Path, args, manifest, codes, stages, cells, sampler, wall) -> dict:
    """Print the stage table and the totals; write them into ``out``."""
    samples, notebooks = sampler.samples, [s for s in stages if s.get("notebook")]
    stages = [peaks([s], samples, notebooks if s.get("between") else ())[0] for s in stages]
    disk = {"run folder": disk_usage(out / "run"),  # the data: what it adds to the photos'
            "rehearsal data": disk_usage(out / "ms-coco", linked_too=False)}  # fmt: skip
    summary = {**codes, "manifest": manifest, "wall_s": wall, "stages": stages, "cells": cells,
               "peak_rss_mb": max((s[1] for s in samples), default=0) / 1024,
               "peak_pss_mb": max((s[2] for s in samples), default=0) / 1024,
               "disk_mb": disk, "errors": [c for c in cells if c["error"]],
               "note": NOT_FOR_ACCURACY}  # fmt: skip
    (out / "rehearsal.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(out / "stages.csv", "w", newline="") as fh:
        fields = ["stage", "seconds", "peak_rss_mb", "peak_pss_mb", "start", "end"]
        writer = csv.DictWriter(fh, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(stages)
    with open(out / "memory.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("time", "rss_kb", "pss_kb", "processes"), *samples])
    print(f"\nrehearsal: {args.n_train} labelled, {args.n_test} test images; "
          f"{' '.join(codes['command'][1:])}\n({NOT_FOR_ACCURACY})\n")  # fmt: skip
    print(table(stages, sampler.works))
    print("\nslowest cells:")
    for c in sorted(cells, key=lambda c: -c["seconds"])[:6]:
        print(f"  {c['seconds']:7.1f} s  {c['stage']} [cell {c['cell']}] {c['first_line']}")
    if sampler.works:
        print(f"\npeak memory of the whole process tree: RSS sum {summary['peak_rss_mb']:.0f} MB, "
              f"PSS sum {summary['peak_pss_mb']:.0f} MB")  # fmt: skip
    else:
        print("\nno /proc on this system: no memory figures")
    for name, mb in disk.items():
        parts = ", ".join(f"{k} {v:.0f}" for k, v in mb.items() if k != "total" and v >= 0.5)
        print(f"disk, {name}: {mb['total']:.0f} MB ({parts})")
    print(f"wall time {wall:.0f} s ({wall / 60:.1f} min); exit codes: run.py {codes['run.py']}, "
          f"hand-in {codes['hand-in']}; written: {out}/rehearsal.json, stages.csv, memory.csv, "
          "run.log")  # fmt: skip
    for c in summary["errors"]:
        print(f"error in {c['stage']}, cell {c['cell']}: {c['error']}")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--out", required=True, type=Path, help="folder outside the repository")
    add("--n-train", type=int, default=65_000, help="labelled images (default 65,000)")
    add("--n-test", type=int, default=4_952, help="test images (default 4,952)")
    add("--source", type=Path, default=SOURCE / "ms-coco", help="real photos, challenge layout")
    add("--backbones", default="efficientnet_lite0", help="as run.py's")
    add("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
        help=f"a parameter of challenge.ipynb, as run.py's ({DEFAULT_PARAMETERS})")  # fmt: skip
    add("--warm-scan", action="store_true", help="keep the data check's remembered verdicts")
    add("--build-only", action="store_true", help="build the data and stop")
    add("--quiet", action="store_true", help="the table only, not run.py's lines")
    args = parser.parse_args(argv)
    out = args.out.expanduser().resolve()
    sampler = Sampler()
    sampler.start()
    t0 = time.time()
    manifest = build_data(args.source, out, args.n_train, args.n_test)
    built = {"stage": "build data" + " (reused)" * manifest["reused"], "start": t0}
    built["end"] = time.time()
    built["seconds"] = built["end"] - t0
    if args.build_only:
        sampler.stop()
        return 0
    codes, stages, cells = rehearse(out, args)
    sampler.stop()
    report(out, args, manifest, codes, [built, *stages], cells, sampler, time.time() - t0)
    return 0 if codes["run.py"] == 0 and codes["hand-in"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
