"""Latency of a model, or of several models side by side on one input: `eval --bench`, `compare`,
and the before/after reports of prune and quantize all time through here.

Side by side, the models take turns, and the order reverses every turn, so a machine that slows
down or speeds up over the run affects every model alike. A turn is one untimed call followed by
up to ``TURN`` timed calls, not a single call (strict A B A B): ONNX Runtime's pool threads keep
spinning on the cores for a while after a call returns, so whatever runs next shares the cores
with them. On a 2-core machine with 2 threads, timing torch and ONNX Runtime call by call gave
an ONNX Runtime / torch ratio of 0.76–0.78 over three repeats, and in turns 0.89–0.91
(benchmarks/export.py; docs/runtime.md): alternating single calls flattered ONNX Runtime. The untimed call absorbs
whatever the previous model left running.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

TURN = 4  # timed calls per turn


def take_turns(predicts: dict[str, Callable], example, iterations: int, warmup: int = 3,
               progress: Callable[[int, int], None] | None = None) -> dict[str, list[float]]:
    """``iterations`` timed calls (ms) of each ``predict(example)``, the models taking turns."""
    names = list(predicts)
    for _ in range(warmup):
        for name in names:
            predicts[name](example)
    times: dict[str, list[float]] = {name: [] for name in names}
    turn = 0
    while len(times[names[0]]) < iterations:
        calls = min(TURN, iterations - len(times[names[0]]))
        for name in (names if turn % 2 == 0 else names[::-1]):
            if len(names) > 1:
                predicts[name](example)  # untimed: lets the previous model's threads settle
            for _ in range(calls):
                start = time.perf_counter()
                predicts[name](example)
                times[name].append((time.perf_counter() - start) * 1000.0)
        turn += 1
        if progress:
            progress(len(times[names[0]]), iterations)
    return times


def latency_stats(times: list[float]) -> dict[str, float]:
    """p50 and p95 of a list of call times, in ms."""
    ordered = sorted(times)
    return {"latency_ms_p50": statistics.median(ordered),
            "latency_ms_p95": ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]}
