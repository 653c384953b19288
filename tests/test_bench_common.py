"""scripts/bench/common.py: the alternated-rounds helper every benchmark shares."""
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts" / "bench"))
import common  # noqa: E402


def test_rounds_rotate_the_order_and_keep_each_contenders_figures():
    calls = []

    def make(name, value):
        return lambda: calls.append(name) or value

    out = common.alternated({"a": make("a", 1.0), "b": make("b", 2.0), "c": make("c", 4.0)}, rounds=3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # none always first
    assert out == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [4.0] * 3}
    with pytest.raises(ValueError, match="rounds"):
        common.alternated({"a": make("a", 1.0)}, rounds=0)


def test_ratio_is_the_median_of_per_round_ratios():
    assert common.ratios([2.0, 3.0, 10.0], [1.0, 2.0, 4.0]) == [2.0, 1.5, 2.5]
    assert common.ratio([2.0, 3.0, 10.0], [1.0, 2.0, 4.0]) == "2.00x (2.00, 1.50, 2.50)"
    with pytest.raises(ValueError, match="equally long"):
        common.ratios([1.0], [1.0, 2.0])


def test_seconds_times_repeated_calls():
    ticks = []
    assert common.seconds(lambda: ticks.append(1), repeat=5, sync=lambda: ticks.append(0)) >= 0
    assert ticks == [0, 1, 1, 1, 1, 1, 0]
