"""The engine's schedulers on a simulated clock: a trace replayed through the real ``Scheduler``
and ``BlockManager`` code with a step-cost model in place of the model. Deterministic, and a
run takes a fraction of a second.

Why: a measured online run's mean JCT moves by 10-15% between two runs of the same seed on a
shared 2-core machine, and a queue amplifies every such wobble, so three seeds cannot tell two
policies apart by less than that. The simulator compares them exactly, on many seeds, and it
can run orders the engine does not offer: ``srpt-oracle`` serves the request with the fewest
output tokens left first, knowing every output length (the trace's requests ignore EOS, so
``max_tokens`` is the true length). No online scheduler can know that; it bounds what any
order of service could reach with these step mechanics, a tighter bound than the no-wait one.

Figures from here are a model, not measurements: ``bench engine`` reports them beside the
measured ones, labelled. Its cost model has the shape of the run's measured decode steps and
prefill profile, scaled so that the simulated capacity equals the measured one (the fitted
parts alone leave out the engine's per-step work around the forward, and a "load 1.2" that
queues far less than the real one compares nothing).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping
from typing import Any

import numpy as np

from fastserve_ray.bench.online_sweep import POLICY_ENGINES, gain_captured
from fastserve_ray.bench.trace import TraceRequest, trace_params, with_poisson_arrivals
from fastserve_ray.engine.block_manager import BlockManager
from fastserve_ray.engine.engine_config import default_preemption_mode
from fastserve_ray.engine.scheduler import Scheduler
from fastserve_ray.engine.scheduler_factory import create_scheduler
from fastserve_ray.engine.scheduler_output import SchedulerOutput
from fastserve_ray.engine.sequence import Sequence

SAMPLED_TOKEN = 5  # any id: the trace ignores EOS, lengths come from max_tokens


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Seconds a step takes: a fixed part, plus per decoding sequence, plus per prefill token."""

    base_s: float
    per_decode_s: float
    per_prefill_token_s: float

    def __call__(self, out: SchedulerOutput) -> float:
        decodes = sum(1 for s in out.scheduled if not s.is_prefill)
        prefill = sum(s.num_new_tokens for s in out.scheduled if s.is_prefill)
        return self.base_s + self.per_decode_s * decodes + self.per_prefill_token_s * prefill

    def prefill_table(self, lengths: tuple[int, ...] = (1, 64, 256, 1024)) -> dict[int, float]:
        """What mlfq's start-up profile would measure under this model."""
        return {n: self.base_s + self.per_prefill_token_s * n for n in lengths}

    def scaled(self, factor: float) -> StepCost:
        """Every part ``factor`` times as long."""
        return StepCost(self.base_s * factor, self.per_decode_s * factor, self.per_prefill_token_s * factor)

    @classmethod
    def calibrate(cls, decode_step_s: Mapping[int, float], prefill_time: Mapping[int, float]) -> StepCost:
        """From measured decode steps by batch size (at least two) and a prefill profile (seconds
        by prompt length, at least two lengths): straight-line fits of both."""
        batches = sorted(decode_step_s)
        lo, hi = batches[0], batches[-1]
        per_decode = max(0.0, (decode_step_s[hi] - decode_step_s[lo]) / (hi - lo))
        base = max(0.0, decode_step_s[lo] - per_decode * lo)
        xs = np.array(sorted(prefill_time), dtype=float)
        slope = float(np.polyfit(xs, [prefill_time[int(x)] for x in xs], 1)[0])
        return cls(base, per_decode, max(slope, 0.0))


class SRPTOracle(Scheduler):
    """Fewest output tokens left first (ties: arrival). Needs every output length in advance,
    which no online scheduler has: a reference for the bench, not an engine policy."""

    policy = "srpt-oracle"

    def _priority(self, seq: Sequence) -> tuple[int, int]:
        return (seq.sampling_params.max_tokens - seq.num_output_tokens, seq.queue_order)


# Label -> (policy, scheduler overrides): the bench's online policies plus the oracle.
SIM_POLICIES: dict[str, tuple[str, dict[str, Any]]] = {
    **POLICY_ENGINES, "srpt-oracle": ("srpt-oracle", {"preemption_mode": "swap"}),
}


@dataclasses.dataclass(frozen=True)
class SimShape:
    """The engine shape being simulated (the online scenario's settings)."""

    num_blocks: int
    num_host_blocks: int  # the host tier a swapping engine of this shape gets
    max_num_seqs: int
    max_num_batched_tokens: int = 512
    block_size: int = 16


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _scheduler(label: str, shape: SimShape, cost: StepCost, clock: _Clock) -> Scheduler:
    policy, overrides = SIM_POLICIES[label]
    mode = overrides.get("preemption_mode", default_preemption_mode(policy))
    host = shape.num_host_blocks if mode == "swap" else 0
    bm = BlockManager(shape.num_blocks, shape.block_size, host, enable_prefix_caching=False)
    kw: dict[str, Any] = dict(max_num_seqs=shape.max_num_seqs,
                              max_num_batched_tokens=shape.max_num_batched_tokens,
                              preemption_mode=mode, clock=clock)
    if policy == "srpt-oracle":
        return SRPTOracle(bm, **kw)
    if policy == "mlfq":
        kw["prefill_time"] = cost.prefill_table()
    return create_scheduler(policy, bm, **kw)


def simulate(label: str, trace: list[TraceRequest], shape: SimShape, cost: StepCost) -> dict[str, float]:
    """One replay: mean and p99 JCT, mean TTFT (seconds from each arrival), the end time, and
    how many requests were preempted for recompute."""
    clock = _Clock()
    sched = _scheduler(label, shape, cost, clock)
    pending = sorted(trace, key=lambda r: r.arrival)
    arrival: dict[int, float] = {}
    first: dict[int, float] = {}
    end: dict[int, float] = {}
    recomputed = 0
    i = 0
    while i < len(pending) or sched.has_unfinished():
        while i < len(pending) and pending[i].arrival <= clock.now:
            seq = Sequence(list(pending[i].prompt), trace_params(pending[i]), arrival_time=pending[i].arrival)
            sched.add(seq)
            arrival[seq.seq_id] = pending[i].arrival
            i += 1
        if not sched.has_unfinished():
            clock.now = pending[i].arrival
            continue
        out = sched.schedule()
        clock.now += cost(out)
        recomputed += len(out.preempted_seq_ids)
        sampled = {s.seq_id: SAMPLED_TOKEN for s in out.scheduled if s.is_sample}
        for seq_id in sampled:
            first.setdefault(seq_id, clock.now)
        for seq in sched.postprocess(out, sampled):
            end[seq.seq_id] = clock.now
    jct = np.array([end[k] - arrival[k] for k in arrival])
    ttft = np.array([first[k] - arrival[k] for k in arrival])
    return {"jct_mean": float(jct.mean()), "jct_p99": float(np.percentile(jct, 99)),
            "ttft_mean": float(ttft.mean()), "end_s": clock.now, "recomputed": recomputed}


def simulated_capacity(base: list[TraceRequest], shape: SimShape, cost: StepCost) -> float:
    """Requests/s with a standing queue, as ``online_sweep.measured_capacity`` measures it: the
    trace twice over under fcfs, all at once, completions counted while requests still wait."""
    clock = _Clock()
    sched = _scheduler("fcfs", shape, cost, clock)
    for r in base + base:
        sched.add(Sequence(list(r.prompt), trace_params(r)))
    done = 0
    while sched.num_waiting > 0:
        out = sched.schedule()
        clock.now += cost(out)
        done += len(sched.postprocess(out, {s.seq_id: SAMPLED_TOKEN for s in out.scheduled if s.is_sample}))
    return max(done, 1) / clock.now


def simulate_sweep(base: list[TraceRequest], rate: float, seeds: range | tuple[int, ...], shape: SimShape,
                   cost: StepCost, labels: tuple[str, ...] = tuple(SIM_POLICIES)) -> dict[str, Any]:
    """Every policy on the same seeded arrivals at ``rate`` req/s; per policy the median over
    seeds of each statistic, and of ``jct_gain_captured`` against fcfs's no-wait bound, with
    its min and max over the seeds where fcfs waits at all (fcfs itself: 0)."""
    runs = {label: [] for label in labels}
    for seed in seeds:
        trace = with_poisson_arrivals(base, rate, seed)
        for label in labels:
            runs[label].append(simulate(label, trace, shape, cost))
    fcfs = runs["fcfs"]
    result: dict[str, Any] = {}
    for label, rs in runs.items():
        bounds = [f["jct_mean"] / max(f["jct_mean"] - f["ttft_mean"], 1e-9) for f in fcfs]
        shares = (gain_captured(f["jct_mean"] / r["jct_mean"], b) for f, r, b in zip(fcfs, rs, bounds))
        captured = [c for c in shares if c is not None]
        row = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        row.update(jct_gain_captured=statistics.median(captured) if captured else None,
                   jct_gain_captured_min=min(captured, default=None),
                   jct_gain_captured_max=max(captured, default=None),
                   jct_p99_vs_fcfs=statistics.median(r["jct_p99"] / f["jct_p99"] for f, r in zip(fcfs, rs)))
        result[label] = row
    return result
