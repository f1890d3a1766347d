"""Side-by-side timing (engine/core/timing.py): who runs when, and how many calls are timed."""

from __future__ import annotations

import pytest

from bigmodel_cli.engine.core.timing import TURN, latency_stats, take_turns


def recorder(names):
    calls: list[str] = []
    return calls, {name: (lambda _x, n=name: calls.append(n)) for name in names}


def test_models_take_turns_of_one_untimed_and_turn_timed_calls_in_alternating_order():
    calls, predicts = recorder(["a", "b", "c"])
    times = take_turns(predicts, None, iterations=10, warmup=1)
    assert {n: len(t) for n, t in times.items()} == {"a": 10, "b": 10, "c": 10}
    # warm-up, then turns of 1 untimed + TURN timed calls, the order reversed every turn; the
    # last turn is cut to the 10 - 2 * TURN calls that are left
    expected = ["a", "b", "c"]
    for order, timed in ((["a", "b", "c"], TURN), (["c", "b", "a"], TURN), (["a", "b", "c"], 10 - 2 * TURN)):
        for name in order:
            expected += [name] * (1 + timed)
    assert calls == expected


def test_a_single_model_has_no_untimed_calls_between_turns():
    calls, predicts = recorder(["only"])
    take_turns(predicts, None, iterations=9, warmup=2)
    assert len(calls) == 2 + 9


def test_progress_counts_timed_calls():
    seen = []
    _, predicts = recorder(["a", "b"])
    take_turns(predicts, None, iterations=6, warmup=0, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(4, 6), (6, 6)]


def test_latency_stats_are_the_median_and_the_95th_percentile():
    stats = latency_stats([5.0, 1.0, 3.0, 2.0, 4.0] * 4)
    assert stats["latency_ms_p50"] == pytest.approx(3.0)
    assert stats["latency_ms_p95"] == pytest.approx(5.0)
