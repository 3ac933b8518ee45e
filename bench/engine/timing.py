"""The sampling loop: pure and framework-free, it only calls a step that ends synchronised.

Every step callable returns with the device's work complete (the impls contract), so a clock read right
before and right after a call brackets exactly one step. Clock: `time.perf_counter_ns` (monotonic,
integer nanoseconds; no float rounding of long runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], int]


@dataclass(frozen=True)
class Timings:
    """Raw times of one cell: the first call alone, then every timed call (all in nanoseconds)."""

    first_call_ns: int
    warmup_calls: int
    samples_ns: list[int] = field(default_factory=list)


def time_call(step: Callable[[], None], clock: Clock = time.perf_counter_ns) -> int:
    """Nanoseconds taken by one call of `step`."""
    start = clock()
    step()
    return clock() - start


def sample(
    step: Callable[[], None],
    *,
    max_iters: int,
    min_time_s: float | None = None,
    min_iters: int = 1,
    clock: Clock = time.perf_counter_ns,
) -> list[int]:
    """Time calls of `step` one by one; keep every sample.

    Without `min_time_s`: exactly `max_iters` calls. With it: stop once `min_time_s` seconds of loop time
    have passed and at least `min_iters` calls are done, or at `max_iters` calls, whichever comes first.
    """
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    budget_ns = None if min_time_s is None else int(min_time_s * 1e9)
    samples: list[int] = []
    loop_start = clock()
    while True:
        t0 = clock()
        step()
        t1 = clock()
        samples.append(t1 - t0)
        if len(samples) >= max_iters:
            break
        if budget_ns is not None and t1 - loop_start >= budget_ns and len(samples) >= min_iters:
            break
    return samples


def measure(
    step: Callable[[], None],
    *,
    warmup: int,
    max_iters: int,
    min_time_s: float | None = None,
    min_iters: int = 1,
    clock: Clock = time.perf_counter_ns,
    on_stage: Callable[[str], None] = lambda name: None,
) -> Timings:
    """First call timed alone (trace/compile cost), then `warmup` untimed calls, then `sample`.

    `on_stage(name)` is called outside the clocked regions before "first_call", "warmup" and "timed",
    and after the loop with "done" (the worker reads memory and reports progress there).
    """
    on_stage("first_call")
    first = time_call(step, clock)
    on_stage("warmup")
    for _ in range(warmup):
        step()
    on_stage("timed")
    samples = sample(step, max_iters=max_iters, min_time_s=min_time_s, min_iters=min_iters, clock=clock)
    on_stage("done")
    return Timings(first_call_ns=first, warmup_calls=warmup, samples_ns=samples)
