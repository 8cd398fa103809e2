"""Break each guard once, and check that the quick tests notice.

    python tools/mutants.py              # every mutant against `pytest -m quick -x`
    python tools/mutants.py --named      # each against the test named for it only (faster)
    python tools/mutants.py lock submission   # the mutants whose name holds one of the words

A guard is code that stops a run before it wastes hours or a leaderboard entry (a duplicate
image id, a test image that does not decode, an empty label set, a torn file, a second run on
one folder). Each mutant below is its minimal break, one text replacement in one file: a
negated condition, a deleted stop, a write in place. The mutants are applied one at a time in
a temporary copy of the repository (the files git tracks or would track, uncommitted changes
included; this working tree is never touched), the tests run there, and the file is restored.
A mutant the tests pass "survived": that guard could be lost without a test failing. The
table says which test killed each one, and in how many seconds. Its first line is the quick
suite without a mutant: tests that fail there already are named, and left out of the others.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUARDS = "tests/test_guards.py"

#: (name, file, text, its replacement, the quick test that must catch it)
MUTANTS = [
    ("duplicate ids: the stop", "cocochallenge/submission.py",
     "    if dupes:\n", "    if False:\n",
     f"{GUARDS}::test_broken_submission_files_are_refused_in_words"),
    ("duplicate ids: the JSON hook", "cocochallenge/submission.py",
     "json.loads(text, object_pairs_hook=_no_duplicates)", "json.loads(text)",
     f"{GUARDS}::test_broken_submission_files_are_refused_in_words"),
    ("missing ids", "cocochallenge/submission.py",
     "        if missing:\n", "        if False:\n",
     "tests/test_submission.py::test_invalid_submission_is_refused_and_old_file_kept"),
    ("sorted class lists", "cocochallenge/submission.py",
     "elif value != sorted(set(value)):", "elif False:",
     "tests/test_submission.py::test_invalid_submission_is_refused_and_old_file_kept"),
    ("decode scan: verify() for a full decode", "cocochallenge/scan.py",
     "img.load()", "img.verify()",
     f"{GUARDS}::test_the_scan_decodes_every_image_in_full"),
    ("test-image stop", "cocochallenge/scan.py",
     "    if test_problems:\n", "    if False:\n",
     f"{GUARDS}::test_a_test_image_that_does_not_decode_stops_before_training"),
    ("empty labels: all of them", "cocochallenge/data.py",
     "if len(Y) and not Y.any():", "if False:",
     f"{GUARDS}::test_label_files_all_empty_stop"),
    ("empty labels: too many", "cocochallenge/data.py",
     "if len(empty) > max(5, max_empty * len(Y)):", "if False:",
     f"{GUARDS}::test_many_empty_label_files_stop_and_a_few_pass"),
    ("atomic_path writes in place", "cocochallenge/files.py",
     "        yield Path(tmp)\n        with open(tmp, \"rb+\") as fh:\n"
     "            os.fsync(fh.fileno())\n        os.replace(tmp, path)\n",
     "        yield path\n",
     "tests/test_robustness.py::test_disk_full_half_way_through_keeps_old_submission"),
    ("torch_save_atomic writes in place", "cocochallenge/files.py",
     "    with atomic_path(path) as tmp:\n        with open(tmp, \"wb\") as fh:\n"
     "            torch.save(obj, fh)",
     "    with contextlib.nullcontext(path) as tmp:\n        with open(tmp, \"wb\") as fh:\n"
     "            torch.save(obj, fh)",
     "tests/test_robustness.py::test_checkpoint_write_failure_keeps_previous"),
    ("lock: a second run goes on", "cocochallenge/files.py",
     "        if why is None:\n", "        if False:\n",
     f"{GUARDS}::test_a_second_run_stops_at_once_and_readers_are_told"),
    ("lock: the holder's own call refused", "cocochallenge/files.py",
     "    if holder is not None and _is_me(holder) and not _gone(holder):",
     "    if False:",
     f"{GUARDS}::test_a_run_holds_its_folder_and_may_call_again"),
    ("lock: an ended holder still holds", "cocochallenge/files.py",
     '        return f"no process {pid} runs on this server any more"', "        return None",
     f"{GUARDS}::test_a_stale_lock_is_taken_over_with_a_note"),
    ("lock: a reused process id still holds", "cocochallenge/files.py",
     "now[1] > started + 2", "False",
     f"{GUARDS}::test_a_stale_lock_is_taken_over_with_a_note"),
    ("lock: kept after exit", "cocochallenge/files.py",
     "        atexit.register(_release_all)", "        pass",
     f"{GUARDS}::test_the_lock_is_released_when_its_holder_exits"),
    ("lock: the hand-in does not say it", "cocochallenge/handin.py",
     "    held_note(run_dir, log)\n", "",
     f"{GUARDS}::test_the_lock_is_released_when_its_holder_exits"),
    ("stale settings", "cocochallenge/runs.py",
     "    if diffs and not retrain:\n", "    if False:\n",
     "tests/test_runs.py::test_finished_backbone_with_other_settings_stops_the_run"),
    ("empty DATA_ROOT", "cocochallenge/data.py",
     "    if not str(root).strip():", "    if False:",
     f"{GUARDS}::test_an_empty_data_root_is_an_error_not_demo_data"),
    ("run.py --data-root ''", "run.py",
     "if args.data_root is not None and not args.data_root.strip():", "if False:",
     f"{GUARDS}::test_run_py_refuses_an_empty_data_root_and_gives_demo_data_by_name"),
    ("a folder without its files", "cocochallenge/data.py",
     "    if any(n.endswith(suffix) for n in names):\n        return",
     "    if True:\n        return",
     f"{GUARDS}::test_no_test_images_stop_before_training"),
    ("images not named .jpg", "cocochallenge/data.py",
     "        if other:\n", "        if False:\n",
     f"{GUARDS}::test_images_named_otherwise_than_jpg_stop"),
    ("oversized images", "cocochallenge/scan.py",
     "if max(img.size) > MAX_IMAGE_SIDE:", "if False:",
     f"{GUARDS}::test_an_oversized_test_image_is_named_in_words"),
    ("a link loop's stat error", "cocochallenge/scan.py",
     '            out[str(f)] = (f"cannot be opened ({err.strerror})", None)', "            raise",
     f"{GUARDS}::test_a_symlink_loop_named_jpg_is_named_in_words"),
    ("write errors in words", "cocochallenge/files.py",
     "        raise cannot_write(path, err) from None", "        raise",
     f"{GUARDS}::test_an_unwritable_run_folder_is_one_sentence"),
    ("a damaged JSON file in words", "cocochallenge/files.py",
     "    except (ValueError, RecursionError) as err:", "    except NotImplementedError as err:",
     f"{GUARDS}::test_damaged_run_files_are_named_with_what_to_do"),
    ("a non-UTF-8 submission", "cocochallenge/submission.py",
     "    except UnicodeDecodeError as err:", "    except NotImplementedError as err:",
     f"{GUARDS}::test_broken_submission_files_are_refused_in_words"),
    ("a deeply nested submission", "cocochallenge/submission.py",
     "    except RecursionError:", "    except NotImplementedError:",
     f"{GUARDS}::test_broken_submission_files_are_refused_in_words"),
    ("an empty test folder", "cocochallenge/submission.py",
     "        if not stems:\n", "        if False:\n",
     f"{GUARDS}::test_a_test_folder_that_is_not_one_is_said_so"),
    # branch evidence
    ("unshrunk thresholds: 0/0", "cocochallenge/metrics.py",
     "    if k == 0:  # its own cut", "    if False:  # its own cut",
     "tests/test_metrics.py::"
     "test_unshrunk_thresholds_keep_each_cut_and_the_global_one_for_a_class_without_positives"),
    ("evidence interval: the spread over repeats", "tools/evidence/evidence.py",
     "np.var(a - b, ddof=1) / len(a) if len(a) > 1 else 0.0", "0.0",
     "tests/test_evidence.py::test_the_spread_over_repeats_widens_the_interval"),
    ("evidence interval: paired resamples", "tools/evidence/evidence.py",
     "f1(pa, W) - f1(pb, W)", "f1(pa, W) - f1(pb, W[::-1])",
     "tests/test_evidence.py::test_two_equal_settings_give_an_interval_around_zero"),
]  # fmt: skip


def copy_repository(dest: Path) -> None:
    """The files git tracks or would track (uncommitted edits included), not ignored ones."""
    listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    names = subprocess.run(listing, cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in names)):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def run_tests(copy: Path, tests: list[str], env: dict) -> tuple[list[str], float]:
    """``(failing tests, seconds)`` of pytest in ``copy`` (stopping at the first with ``-x``)."""
    t0 = time.perf_counter()
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *tests]
    out = subprocess.run(args, cwd=copy, env=env, capture_output=True, text=True, timeout=1200)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out.stdout, re.M)
    failed = [f if f.endswith("]") or "[" not in f else f"{f.split('[')[0]}[...]" for f in failed]
    if out.returncode not in (0, 1) and not failed:
        raise RuntimeError(f"pytest could not run ({out.returncode}):\n{out.stdout[-3000:]}")
    return failed, time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("words", nargs="*", help="only the mutants whose name holds one of these")
    parser.add_argument("--named", action="store_true", help="run only the test named for each")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.words or any(w in m[0] for w in args.words)]
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        copy = Path(tmp) / "repo"
        copy_repository(copy)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("COCO_")},
               "XDG_CACHE_HOME": str(Path(tmp) / "cache")}  # fmt: skip
        probe = [sys.executable, "-c", "import cocochallenge; print(cocochallenge.__file__)"]
        where = subprocess.run(probe, cwd=copy, env=env, capture_output=True, text=True).stdout
        if not where.startswith(str(copy)):  # else the mutants would not be what runs
            raise SystemExit(f"the copy imports another cocochallenge: {where}")
        failed, seconds = run_tests(copy, ["-m", "quick"], env)
        print(f"{'mutant':42} {'result':9} {'seconds':>7}  test that failed")
        print(f"{'(none: the quick suite as it is)':42} {'fails' if failed else 'passes':9} "
              f"{seconds:7.1f}  {' '.join(failed)}")  # fmt: skip
        # tests that fail already (work in progress elsewhere) cannot tell a mutant: left out
        known = [f"--deselect={f.split('[')[0]}" for f in failed]
        survived = 0
        for name, file, old, new, test in chosen:
            path = copy / file
            original = path.read_text()
            if original.count(old) != 1:
                print(f"{name:42} {'NOT FOUND':9} {'':>7}  ({file}: the text to break is not "
                      "there once: update MUTANTS)")  # fmt: skip
                survived += 1
                continue
            path.write_text(original.replace(old, new))
            try:
                tests = [test] if args.named else ["-x", "-m", "quick", *known]
                failed, seconds = run_tests(copy, tests, env)
            finally:
                path.write_text(original)
            survived += not failed
            result = "killed" if failed else "SURVIVED"
            shown = failed[0] if failed else f"(expected: {test})"
            print(f"{name:42} {result:9} {seconds:7.1f}  {shown}", flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} mutants killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
