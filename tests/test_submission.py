"""Writing, validating and scoring the leaderboard JSON."""

import json

import numpy as np
import pytest
from PIL import Image

from cocochallenge import submission

pytestmark = pytest.mark.quick


@pytest.fixture()
def test_dir(tmp_path):
    d = tmp_path / "images" / "test-resized"
    d.mkdir(parents=True)
    for s in ("000000000139", "000000000285", "000000000632"):
        Image.new("RGB", (8, 8)).save(d / f"{s}.jpg")
    return d


GOOD = {"000000000139": [56, 60, 62], "000000000285": [21], "000000000632": []}


def test_write_and_read_back(tmp_path, test_dir):
    path = submission.write_submission(GOOD, tmp_path / "sub.json", test_dir)
    assert json.loads(path.read_text()) == GOOD
    assert not list(tmp_path.glob(".sub.json*"))  # no temporary file left behind


def test_predictions_to_submission():
    pred = np.zeros((2, 80), bool)
    pred[0, [62, 56, 60]] = True
    sub = submission.predictions_to_submission(np.array(["000000000139", "000000000285"]), pred)
    assert sub == {"000000000139": [56, 60, 62], "000000000285": []}
    assert all(type(k) is str for k in sub) and all(type(c) is int for c in sub["000000000139"])


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda s: s.pop("000000000285"), "have no prediction"),
        (lambda s: s.update({"000000000999": [1]}), "not test images"),
        (lambda s: s.update({"139": [1]}), "12-digit"),
        (lambda s: s.update({"000000000139": [80]}), "not class indices"),
        (lambda s: s.update({"000000000139": ["3"]}), "not class indices"),
        (lambda s: s.update({"000000000139": [True]}), "not class indices"),
        (lambda s: s.update({"000000000139": [5, 3]}), "sorted"),
        (lambda s: s.update({"000000000139": [3, 3]}), "sorted"),
        (lambda s: s.update({"000000000139": 3}), "must be a list"),
    ],
)
def test_invalid_submission_is_refused_and_old_file_kept(tmp_path, test_dir, mutate, message):
    path = submission.write_submission(GOOD, tmp_path / "sub.json", test_dir)
    before = path.read_bytes()
    bad = {k: list(v) for k, v in GOOD.items()}
    mutate(bad)
    with pytest.raises(submission.SubmissionError, match=message):
        submission.write_submission(bad, path, test_dir)
    assert path.read_bytes() == before


def test_replacing_keeps_a_backup(tmp_path, test_dir):
    path = submission.write_submission(GOOD, tmp_path / "sub.json", test_dir)
    new = dict(GOOD, **{"000000000632": [1]})
    submission.write_submission(new, path, test_dir)
    assert json.loads(path.read_text()) == new
    assert json.loads((tmp_path / "sub.json.bak").read_text()) == GOOD


def test_score_against_hand_computed_answers():
    answers = {"000000000001": [0, 1], "000000000002": [0], "000000000003": [2]}
    sub = {"000000000001": [0], "000000000002": [0, 2], "000000000003": [2]}
    s = submission.score_submission(sub, answers)
    # class 0: 2 pos, tp 2 fp 0 -> P 1, R 1; class 1: 1 pos, tp 0 -> 0, 0;
    # class 2: 1 pos, tp 1, fp 1 -> P 0.5, R 1. Weights 1/2, 1, 1 -> 0.2, 0.4, 0.4
    P, R = 0.2 * 1 + 0.4 * 0.5, 0.2 + 0.4
    assert s["precision"] == pytest.approx(P) and s["recall"] == pytest.approx(R)
    assert s["course_f1"] == pytest.approx(2 * P * R / (P + R))
    assert s["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert s["n_images"] == 3 and s["n_missing"] == 0
    partial = submission.score_submission({"000000000001": [0, 1]}, answers)
    assert partial["n_missing"] == 2 and partial["recall"] < 1
