"""Alternating timer: every provider is called once per repetition, in rotation, in one process.

Timing providers one after the other (all of A's repetitions, then all of B's) lets a change in the
machine's state (another process, the CPU's clock, the page cache) land on one of them only.
Interleaving them spreads it over all; the median of each provider's repetitions then drops the
outliers. The rotation also starts at a different provider each repetition, so that none always runs
right after the same other one (whose memory traffic may still be draining from the caches).

Each call is timed alone with :func:`time.perf_counter`; its ``prepare`` (resetting gradients,
say) runs before the clock starts. The garbage collector is off while timing.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["Timed", "Timings", "alternate"]


@dataclass
class Timed:
    """A provider's call: ``run`` is timed, ``prepare`` (optional) runs untimed just before it."""

    run: Callable[[], object]
    prepare: Callable[[], object] | None = None


@dataclass
class Timings:
    """Per-provider seconds of each timed repetition; ``errors``: providers that raised (dropped)."""

    times: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    reps: int = 0
    warmup: int = 0

    def median(self, name: str) -> float:
        """The median of ``name``'s timed repetitions (NaN if it has none)."""
        t = self.times.get(name)
        return statistics.median(t) if t else math.nan


def _call(name: str, timed: Timed, errors: dict[str, BaseException]) -> float | None:
    try:
        if timed.prepare is not None:
            timed.prepare()
        start = time.perf_counter()
        timed.run()
        return time.perf_counter() - start
    except Exception as e:  # a provider that fails is reported, not fatal
        errors[name] = e
        return None


def alternate(
    calls: Mapping[str, Timed],
    *,
    reps: int | None = None,
    warmup: int = 2,
    min_reps: int = 5,
    max_reps: int = 200,
    budget_s: float = 2.0,
) -> Timings:
    """Time ``calls`` alternately: ``warmup`` untimed rotations, then ``reps`` timed ones.

    Without ``reps``, the repetitions fill ``budget_s`` seconds (estimated from the last warm-up
    rotation), clamped to ``[min_reps, max_reps]``.
    """
    result = Timings(times={name: [] for name in calls}, warmup=warmup)
    active = list(calls)
    was_enabled = gc.isenabled()
    gc.collect(0)  # young objects only: a full collection of torch's heap takes a fifth of a second
    gc.disable()
    try:
        rotation_s = 0.0
        for _ in range(max(warmup, 1 if reps is None else 0)):
            rotation_s = 0.0
            for name in list(active):
                t = _call(name, calls[name], result.errors)
                if t is None:
                    active.remove(name)
                else:
                    rotation_s += t
        if reps is None:
            reps = math.ceil(budget_s / rotation_s) if rotation_s > 0 else max_reps
            reps = max(min_reps, min(max_reps, reps))
        result.reps = reps
        for i in range(reps):
            if not active:
                break
            k = i % len(active)
            for name in active[k:] + active[:k]:
                t = _call(name, calls[name], result.errors)
                if t is None:
                    active.remove(name)
                else:
                    result.times[name].append(t)
    finally:
        if was_enabled:
            gc.enable()
    for name in result.errors:
        result.times[name] = []
    return result
