"""The evidence tool's paired comparison, on synthetic predictions, and the table it wrote."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cocochallenge import analysis, metrics
from cocochallenge.config import NUM_CLASSES

pytestmark = pytest.mark.quick
TOOL = Path(__file__).resolve().parents[1] / "tools" / "evidence" / "evidence.py"
_spec = importlib.util.spec_from_file_location("evidence_tool", TOOL)
evidence = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evidence)


def _truth(n=600, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, NUM_CLASSES)) < 0.06


def _noisy(y, flip, seed):
    """The truth with a share ``flip`` of its entries flipped: more flips, a lower F1."""
    return y ^ (np.random.default_rng(seed).random(y.shape) < flip)


def test_a_known_difference_is_found_with_the_interval_around_it():
    y = _truth()
    good, bad = _noisy(y, 0.01, 1), _noisy(y, 0.05, 2)
    d = evidence.paired(y, [[good]], [[bad]])
    expected = metrics.course_f1(y, good)["f1"] - metrics.course_f1(y, bad)["f1"]
    assert d["difference"] == pytest.approx(expected)
    assert d["a"] == pytest.approx(metrics.course_f1(y, good)["f1"])
    assert expected > 0.1 and 0 < d["lo"] < d["difference"] < d["hi"]
    reverse = evidence.paired(y, [[bad]], [[good]])
    assert reverse["difference"] == pytest.approx(-expected) and reverse["hi"] < 0


def test_two_equal_settings_give_an_interval_around_zero():
    y = _truth()
    same = _noisy(y, 0.03, 1)
    d = evidence.paired(y, [[same]], [[same]])
    assert d["difference"] == d["lo"] == d["hi"] == 0
    # equally good, different errors: the interval holds 0, and the difference is small
    d = evidence.paired(y, [[same], [_noisy(y, 0.03, 3)]], [[_noisy(y, 0.03, 2)], [same]])
    assert d["lo"] < 0 < d["hi"] and abs(d["difference"]) < 0.02


def test_the_spread_over_repeats_widens_the_interval():
    y = _truth()
    a1, a2, b = _noisy(y, 0.01, 1), _noisy(y, 0.04, 2), _noisy(y, 0.03, 3)
    pooled = evidence.paired(y, [[a1, a2]], [[b, b]])  # one repeat: the photos' noise only
    repeated = evidence.paired(y, [[a1], [a2]], [[b], [b]])  # the same, as two repeats
    assert repeated["difference"] == pytest.approx(pooled["difference"])
    assert list(repeated["per repeat"]) == pytest.approx(
        [metrics.course_f1(y, a)["f1"] - metrics.course_f1(y, b)["f1"] for a in (a1, a2)]
    )
    assert repeated["hi"] - repeated["lo"] > 1.5 * (pooled["hi"] - pooled["lo"])


def test_the_committed_table_is_read_by_the_analysis_and_each_row_is_a_paired_comparison():
    table = pd.read_csv(analysis.EVIDENCE)
    assert 1 <= len(table) <= 8
    d, lo, hi = (table[f"course F1 difference{s}"] for s in ("", " lo", " hi"))
    assert ((lo <= d) & (d <= hi)).all()
    gap = table["setting course F1"] - table["against course F1"]
    assert np.allclose(gap, d, atol=0.0015)  # both rounded to three decimals
    shown = analysis.with_intervals(table.set_index("setting"))
    assert (
        shown["course F1 difference"].str.match(r"-?\d\.\d{3} \[-?\d\.\d{3}, -?\d\.\d{3}\]").all()
    )
    settings = " ".join(table["setting"])
    for name in ("pad", "LOSS", "shrink", "at_least_one", "freeze_bn"):
        assert name in settings, name
