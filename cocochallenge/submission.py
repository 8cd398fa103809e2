"""The hand-in: strict JSON, validated against the test folder before it is written.

A submission under an existing group name overwrites the team's entry, so a malformed file
costs the team its place: nothing is written until every check passes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import NUM_CLASSES
from .data import list_files
from .files import SaysWhatToDo, atomic_path
from .metrics import evaluate_predictions


class SubmissionError(SaysWhatToDo, ValueError):
    """A submission that the leaderboard would reject or misread; nothing was written."""


def _no_duplicates(pairs):
    seen, dupes = {}, []
    for key, value in pairs:
        if key in seen:
            dupes.append(key)
        seen[key] = value
    if dupes:
        raise SubmissionError(
            f"duplicate image ids {sorted(set(dupes))[:5]}: JSON keeps only the "
            "last prediction of each, and the leaderboard would score that one"
        )
    return seen


def read_submission(path: Path | str) -> dict:
    """Read a submission JSON strictly: a syntax error or a repeated image id is a
    :class:`SubmissionError` in one worded line, with the position of the error."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise SubmissionError(f"{path}: cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise SubmissionError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at position {err.start}): "
            "not a JSON file, or saved in another encoding; write it with write_submission"
        ) from None
    if not text.strip():
        raise SubmissionError(f"{path}: the file is empty")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise SubmissionError(
            f"{path}: nested too deeply to read: a submission is one object of lists of class "
            "indices, nested twice"
        ) from None
    except json.JSONDecodeError as err:
        hint = ""
        if "property name" in err.msg and text[: err.pos].rstrip().endswith(","):
            hint = " (a comma after the last entry?)"
        elif "property name" in err.msg or "Expecting value" in err.msg and "'" in text:
            hint = " (JSON needs double quotes, not single ones)"
        if err.pos >= len(text.rstrip()):
            hint = " (the file ends too early: was it cut off?)"
        raise SubmissionError(
            f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}{hint}"
        ) from None
    except SubmissionError:  # a repeated image id, said by _no_duplicates
        raise
    except ValueError as err:  # Python reads at most 4,300 digits into an int
        raise SubmissionError(
            f"{path}: holds a number too long to read ({str(err).split(':')[0]}): class "
            f"indices are 0..{NUM_CLASSES - 1}; write the file with write_submission"
        ) from None


def predictions_to_submission(stems, pred: np.ndarray) -> dict:
    """``{file stem: sorted list of class ints}`` from binary predictions ``(N, 80)``."""
    pred = np.asarray(pred).astype(bool)
    if len(stems) != len(pred):
        raise SubmissionError(f"{len(stems)} image ids but {len(pred)} prediction rows")
    return {str(s): [int(c) for c in np.flatnonzero(row)] for s, row in zip(stems, pred)}


def submission_problems(sub, test_stems=None, what: str = "submission") -> list[str]:
    """Every reason the leaderboard would reject or misread ``sub`` (empty list: valid).

    ``what="answers"`` checks a file of true labels, which need not list them sorted."""
    if not isinstance(sub, dict):
        return [f"the {what} must be a JSON object (dict), not {type(sub).__name__}"]
    if not sub:
        return [f"the {what} is empty: it has no image at all"]
    problems = []
    for key, value in sub.items():
        if not isinstance(key, str) or not (len(key) == 12 and key.isdigit()):
            problems.append(f"key {key!r} is not a 12-digit image id (file stem, no extension)")
        if not isinstance(value, list):
            problems.append(
                f"{key}: value must be a list of class indices, not {type(value).__name__}"
            )
            continue
        bad = [
            v
            for v in value
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < NUM_CLASSES
        ]
        if bad:
            problems.append(f"{key}: {bad[:5]} not class indices (ints 0..{NUM_CLASSES - 1})")
        elif value != sorted(set(value)) and what == "submission":
            problems.append(f"{key}: {value} must be sorted and without duplicates")
    if test_stems is not None:
        expected = set(test_stems)
        missing = sorted(expected - set(sub))
        extra = sorted(set(sub) - expected)
        if missing:
            problems.append(f"{len(missing)} test images have no prediction, e.g. {missing[:3]}")
        if extra:
            problems.append(f"{len(extra)} ids are not test images, e.g. {extra[:3]}")
    return problems


def validate_submission(sub, test_dir: Path | str | None = None) -> None:
    """Raise :class:`SubmissionError` listing the problems; with ``test_dir`` every test image
    must appear exactly once (JSON keys are unique, so 'once' means 'present')."""
    stems = None
    if test_dir is not None:
        if not str(test_dir).strip():
            raise SubmissionError(
                f"the test folder is an empty name ({str(test_dir)!r}): give the "
                "images/test-resized folder of the course's data, to check that every test "
                "image has its prediction"
            )
        if not Path(test_dir).is_dir():
            what = "is a file" if Path(test_dir).exists() else "does not exist"
            raise SubmissionError(
                f"the test folder {test_dir} {what}: give the images/test-resized folder of the "
                "course's data, to check that every test image has its prediction"
            )
        stems = [n[:-4] for n in list_files(test_dir, ".jpg")]
        if not stems:
            raise SubmissionError(
                f"the test folder {test_dir} holds no .jpg image: nothing to check against; give "
                "the images/test-resized folder of the course's data"
            )
    problems = submission_problems(sub, stems)
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise SubmissionError("invalid submission:\n  " + "\n  ".join(problems[:10]) + more)


def write_submission(sub: dict, path: Path | str, test_dir: Path | str | None = None) -> Path:
    """Validate, then write atomically; a previous valid file is kept as ``<name>.bak``.

    The leaderboard overwrites a group's entry with each upload, so a broken file costs the
    entry: an invalid submission is refused here, before anything on disk changes.
    """
    validate_submission(sub, test_dir)
    path = Path(path)
    if path.exists():
        try:
            old = read_submission(path)
            if not submission_problems(old):
                with atomic_path(path.with_name(path.name + ".bak")) as tmp:
                    tmp.write_bytes(path.read_bytes())
        except (OSError, ValueError):
            pass  # an unreadable old file is not worth keeping
    text = "{\n" + ",\n".join(f'"{k}": {json.dumps(v)}' for k, v in sorted(sub.items())) + "\n}\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def score_submission(sub: dict | Path | str, answers: dict | Path | str) -> dict:
    """Score a submission against answers the way the leaderboard does.

    Course F1 with its precision and recall, plus macro and micro F1, over the images of
    ``answers``; an image missing from the submission counts as predicted empty. Use it on
    your validation split to rehearse before uploading. A file that cannot be read, or is
    not ``{12-digit image id: [class indices]}``, is a :class:`SubmissionError` naming it.
    """
    sub, answers = _scorable(sub, "submission"), _scorable(answers, "answers")
    stems = sorted(answers)
    y = np.zeros((len(stems), NUM_CLASSES), dtype=bool)
    p = np.zeros_like(y)
    for i, s in enumerate(stems):
        y[i, answers[s]] = True
        p[i, [c for c in sub.get(s, []) if 0 <= c < NUM_CLASSES]] = True
    out = evaluate_predictions(y, p.astype(np.float32), thresholds=0.5)
    out.pop("mAP")
    out["n_images"] = len(stems)
    out["n_missing"] = sum(1 for s in stems if s not in sub)
    return out


def _scorable(obj, what: str) -> dict:
    """A submission or answers (a dict, or the JSON file of one), checked before scoring."""
    name = obj if isinstance(obj, (str, Path)) else f"the {what}"
    obj = read_submission(obj) if isinstance(obj, (str, Path)) else obj
    problems = submission_problems(obj, what=what)
    if problems:
        more = " ..." if len(problems) > 3 else ""
        raise SubmissionError(f"{name} cannot be scored: {'; '.join(problems[:3])}{more}")
    return obj
