"""FastServe's skip-join multi-level feedback queue (MLFQ) scheduler.

Queue ``i`` has quantum ``base_quantum * 2**i``; queue 0 runs first. Units: quanta are
*estimated model seconds*, the same unit as the prefill-time estimator the engine profiles once
at start-up. A step charges each scheduled sequence its estimated cost (a prefill chunk
``[a, b)`` costs ``prefill_time(b) - prefill_time(a)``, a decode costs ``decode_time``), so the
policy is deterministic and never reads a wall clock except for the starvation guard. Tokens
recomputed after a preemption are not charged again: every demotion then follows real progress,
so demotion and starvation promotion cannot chase each other forever.

- Skip-join: a new request enters the highest queue whose quantum covers its estimated prefill
  time, skipping the queues above, so long prompts cannot block short ones in queue 0.
- Demotion: a sequence that used up its queue's quantum moves down one queue, to the tail.
- Starvation guard: a sequence not scheduled for ``starvation_threshold`` clock seconds is
  promoted to queue 0.
- Within a queue, first come first served. Preemption happens at token granularity through the
  shared step mechanics in scheduler.py (lowest queue, latest arrival evicted first), with KV
  swapped to the host tier (default) or dropped for recompute.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fastserve_ray.engine.block_manager import KVCacheManager
from fastserve_ray.engine.scheduler import Scheduler
from fastserve_ray.engine.scheduler_output import ScheduledSequence
from fastserve_ray.engine.sequence import Sequence
from fastserve_ray.errors import ConfigError

PrefillTimeEstimator = Callable[[int], float]


class PrefillTimeTable:
    """Estimated prefill seconds by prompt length, interpolated between profiled points."""

    def __init__(self, points: Mapping[int, float] | Iterable[tuple[int, float]]) -> None:
        pairs = sorted(dict(points).items())
        if not pairs:
            raise ConfigError("prefill time table needs at least one (num_tokens, seconds) point")
        for num_tokens, seconds in pairs:
            if num_tokens < 1 or not math.isfinite(seconds) or seconds < 0:
                raise ConfigError(
                    f"prefill time table: bad point ({num_tokens!r}, {seconds!r}); need "
                    f"num_tokens >= 1 and finite seconds >= 0"
                )
        pairs.insert(0, (0, 0.0))  # nothing to prefill costs nothing
        self.num_tokens = [n for n, _ in pairs]
        self.seconds = [s for _, s in pairs]

    def __call__(self, num_tokens: int) -> float:
        """Seconds to prefill ``num_tokens`` tokens (linear beyond the last point)."""
        xs, ys = self.num_tokens, self.seconds
        i = min(max(bisect.bisect_right(xs, num_tokens), 1), len(xs) - 1)
        slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
        return max(0.0, ys[i - 1] + slope * (num_tokens - xs[i - 1]))


def _as_estimator(
    prefill_time: PrefillTimeEstimator | Mapping[int, float] | None,
) -> PrefillTimeEstimator:
    if prefill_time is None:
        return lambda num_tokens: float(num_tokens)  # uncalibrated: one unit per token
    if callable(prefill_time):
        return prefill_time
    return PrefillTimeTable(prefill_time)


class MLFQScheduler(Scheduler):
    """FastServe's skip-join MLFQ with demotion, starvation promotion and token-level preemption."""

    policy = "mlfq"

    def __init__(
        self,
        block_manager: KVCacheManager,
        *,
        num_queues: int = 8,
        base_quantum: float | None = None,
        prefill_time: PrefillTimeEstimator | Mapping[int, float] | None = None,
        decode_time: float | None = None,
        starvation_threshold: float | None = None,
        preemption_mode: str = "swap",
        swap_watermark: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            block_manager, preemption_mode=preemption_mode, swap_watermark=swap_watermark, **kwargs
        )
        if num_queues < 1:
            raise ConfigError(f"num_queues must be >= 1, got {num_queues}")
        self.num_queues = num_queues
        self.prefill_time = _as_estimator(prefill_time)
        # Defaults: a decode costs what a one-token prefill costs, and queue 0's quantum is one
        # decode step, so quanta read as 1, 2, 4, ... decode steps.
        self.decode_time = self.prefill_time(1) if decode_time is None else decode_time
        self.base_quantum = self.decode_time if base_quantum is None else base_quantum
        for name in ("decode_time", "base_quantum"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        if starvation_threshold is not None and not starvation_threshold > 0:
            raise ConfigError(
                f"starvation_threshold must be > 0 seconds or None, got {starvation_threshold!r}"
            )
        self.starvation_threshold = starvation_threshold

    def quantum(self, level: int) -> float:
        """Service (estimated seconds) a sequence gets in queue ``level`` before demotion."""
        if level >= self.num_queues - 1:
            return math.inf  # the last queue is round-robin by arrival: nowhere to demote to
        return self.base_quantum * 2**level

    def skip_join_level(self, num_prompt_tokens: int) -> int:
        """The highest queue whose quantum covers the estimated prefill time."""
        estimate = self.prefill_time(num_prompt_tokens)
        for level in range(self.num_queues):
            if self.base_quantum * 2**level >= estimate:
                return level
        return self.num_queues - 1

    def _priority(self, seq: Sequence) -> tuple[int, int]:
        return (seq.queue_level, seq.queue_order)

    def _enter_queue(self, seq: Sequence, level: int) -> None:
        seq.queue_level = level
        seq.quantum_used = 0.0
        seq.queue_order = self._next_queue_order()  # the tail of its new queue

    def _on_add(self, seq: Sequence) -> None:
        seq.queue_level = self.skip_join_level(seq.num_prompt_tokens)
        seq.quantum_used = 0.0

    def _before_schedule(self, now: float) -> None:
        if self.starvation_threshold is None:
            return
        for seq in self.sequences.values():
            if seq.queue_level > 0 and now - seq.last_scheduled_time >= self.starvation_threshold:
                self._enter_queue(seq, 0)
                seq.last_scheduled_time = now

    def _on_computed(self, seq: Sequence, item: ScheduledSequence) -> None:
        end = item.num_computed_tokens + item.num_new_tokens
        start = max(item.num_computed_tokens, seq.num_charged_tokens)  # recompute is free
        if end <= start:
            return
        if item.is_prefill:
            cost = self.prefill_time(end) - (self.prefill_time(start) if start else 0.0)
        else:
            cost = self.decode_time
        seq.num_charged_tokens = end
        seq.quantum_used += max(cost, 0.0)
        quantum = self.quantum(seq.queue_level)
        # A relative tolerance so that estimates summing exactly to the quantum count as used up.
        if seq.quantum_used >= quantum * (1 - 1e-9):
            self._enter_queue(seq, seq.queue_level + 1)
