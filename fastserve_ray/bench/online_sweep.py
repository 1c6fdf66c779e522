"""The online half of `bench engine`: fcfs vs mlfq on Poisson arrivals, swept over load.

Each scenario is a deployment shape. Its capacity (requests/s) is measured with a standing
queue under fcfs, then both policies replay the same seeded arrivals at fractions of it, one
run per (load, seed, policy), each on a fresh engine. Mean and p99 job completion time (JCT)
and time to first token (TTFT) are kept per run; per load, the median over seeds. "Near
saturation" is the knee: the lowest load where fcfs's mean TTFT has tripled from the lightest.

Scenarios: FastServe's gains come from head-of-line blocking, when the requests holding the
batch's resources are long ones and short ones wait behind them. With a KV cache that holds
only a few full-length sequences ("kv-bound"), long requests hold the memory and fcfs queues;
that is the headline. "overload" is the FastServe paper's own setting on the same memory:
twice as many requests arriving at 2x capacity, so the queue keeps growing for the whole
arrival span. With ample memory and a batch of 8 ("slot-bound") a slot frees whenever any of 8
requests ends, short jobs rarely wait, and there is little for any policy to win.

Policies: fcfs and mlfq with their engine defaults (fcfs recomputes a preempted request, mlfq
swaps its KV to the host tier), and where memory is scarce also "fcfs-swap", fcfs with mlfq's
swapping: the better-configured fcfs on such a trace, reported beside the headline so that
mlfq's gain over its own preemption mode is not credited to its order of service.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastserve_ray.bench.report import Progress
from fastserve_ray.bench.trace import TraceRequest, make_trace, trace_params, with_poisson_arrivals
from fastserve_ray.config import ModelConfig
from fastserve_ray.engine import LLMEngine, SamplingParams

POLICIES = ("fcfs", "mlfq")  # every scenario runs these; gain_captured compares them
# Label -> (engine policy, engine overrides) for every policy a scenario may run.
POLICY_ENGINES: dict[str, tuple[str, dict[str, Any]]] = {
    "fcfs": ("fcfs", {}), "mlfq": ("mlfq", {}), "fcfs-swap": ("fcfs", {"preemption_mode": "swap"}),
}
BLOCK_SIZE = 16  # the engine's default KV block


@dataclasses.dataclass(frozen=True)
class OnlineScenario:
    """One deployment shape for the load sweep."""

    name: str
    about: str
    max_num_seqs: int
    requests: int  # per run
    loads: tuple[float, ...]  # fractions of the measured capacity
    kv_full_sequences: int | None = None  # KV cache for this many full-length sequences; None: default
    capacity_of: str | None = None  # reuse this (earlier) scenario's measured capacity: same shape
    policies: tuple[str, ...] = POLICIES  # labels of POLICY_ENGINES, fcfs and mlfq first

    def engine_kw(self, max_len: int) -> dict[str, Any]:
        """Engine settings for a trace whose prompt + output never exceeds ``max_len`` tokens."""
        kw: dict[str, Any] = dict(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=512,
                                  clock=time.perf_counter)
        if self.kv_full_sequences is not None:
            kw["num_blocks"] = self.kv_full_sequences * math.ceil(max_len / BLOCK_SIZE)
        return kw

    def quick(self) -> OnlineScenario:
        """The same shape with a handful of requests and at most two loads (smoke tests)."""
        return dataclasses.replace(self, requests=6, loads=(0.8, 1.2)[: len(self.loads)])


SCENARIOS = (
    OnlineScenario("kv-bound", "KV cache for 3 full-length sequences, batch up to 32",
                   max_num_seqs=32, requests=96, loads=(0.5, 0.8, 1.0, 1.2), kv_full_sequences=3,
                   policies=(*POLICIES, "fcfs-swap")),
    OnlineScenario("overload", "FastServe's setting: the kv-bound shape, 192 requests at 2x capacity",
                   max_num_seqs=32, requests=192, loads=(2.0,), kv_full_sequences=3,
                   policies=(*POLICIES, "fcfs-swap"), capacity_of="kv-bound"),
    OnlineScenario("slot-bound", "ample KV cache, batch of 8", max_num_seqs=8, requests=48,
                   loads=(0.5, 1.0, 1.5, 2.0)),
)


def measured_capacity(engine: LLMEngine, trace: list[TraceRequest]) -> float:
    """Requests/s the engine completes while a queue is standing: the trace twice over, all
    submitted at once, completions counted until the waiting queue runs dry.

    Counting to the end instead would charge the drain (the batch emptying around the last,
    longest requests) to the capacity; that underestimate kept the earlier sweep from ever
    building a queue, even at "1.2x capacity".
    """
    engine.generate([trace[0].prompt], [SamplingParams(max_tokens=2, ignore_eos=True)])  # warm-up
    for r in trace + trace:
        engine.add_request(r.prompt, trace_params(r))
    t0 = time.perf_counter()
    done = 0
    while engine.load_snapshot()["num_waiting"] > 0:
        done += sum(o.finished for o in engine.step())
    elapsed = time.perf_counter() - t0
    while engine.has_unfinished():
        engine.step()
    return max(done, 1) / elapsed


def online(engine: LLMEngine, trace: list[TraceRequest]) -> dict[str, list[float]]:
    """Replay arrivals in wall-clock time; per-request JCT, TTFT and TPOT in seconds, and each
    finished request's output length (same order as the JCTs).

    Times count from each request's *scheduled* arrival, so time spent waiting for the
    loop to come round (queueing) is charged as it would be for a real client.
    The engine must use ``time.perf_counter`` as its clock.
    """
    pending = sorted(trace, key=lambda r: r.arrival)
    arrival_of: dict[str, float] = {}
    length_of: dict[str, int] = {}
    done = []
    t0 = time.perf_counter()
    i = 0
    while i < len(pending) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while i < len(pending) and pending[i].arrival <= now:
            rid = engine.add_request(pending[i].prompt, trace_params(pending[i]))
            arrival_of[rid] = t0 + pending[i].arrival
            length_of[rid] = pending[i].output_len
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[i].arrival - (time.perf_counter() - t0)))
            continue
        done.extend(out for out in engine.step() if out.finished)
    return {
        "jct": [o.metrics.finish_time - arrival_of[o.request_id] for o in done],
        "ttft": [o.metrics.first_token_time - arrival_of[o.request_id] for o in done],
        "tpot": [o.time_per_output_token for o in done if o.time_per_output_token is not None],
        "output_len": [length_of[o.request_id] for o in done],
    }


def _p99(xs: list[float]) -> float:
    return float(np.percentile(xs, 99))


def run_stats(r: dict[str, list[float]], short_len: float) -> dict[str, float]:
    """One run's summary: mean and p99 JCT and TTFT, and the mean JCT of the short requests
    (output at most ``short_len`` tokens), where a policy that removes waiting shows first."""
    jct = np.asarray(r["jct"])
    short = np.asarray(r["output_len"]) <= short_len
    return {"jct_mean": float(jct.mean()), "jct_p99": _p99(r["jct"]),
            "ttft_mean": float(np.mean(r["ttft"])), "ttft_p99": _p99(r["ttft"]),
            "jct_mean_short": float(jct[short].mean())}


def expected_sweep_seconds(num_requests: int, capacity: float, loads: tuple[float, ...],
                           seeds: tuple[int, ...], policies: tuple[str, ...] = POLICIES) -> float:
    """A lower bound on the sweep's wall time: each run lasts at least its arrival span."""
    return sum(len(policies) * len(seeds) * (num_requests - 1) / (load * capacity) for load in loads)


def load_sweep(model: torch.nn.Module, tokenizer, base: list[TraceRequest], capacity: float,
               loads: tuple[float, ...], seeds: tuple[int, ...], online_kw: dict[str, Any],
               progress: Progress | None = None, label: str = "online",
               policies: tuple[str, ...] = POLICIES) -> list[dict[str, Any]]:
    """Each policy on the same Poisson arrivals at each load and seed; means and p99s per run."""
    progress = progress or Progress()
    short_len = statistics.median(r.output_len for r in base)
    points = []
    runs, total = 0, len(policies) * len(loads) * len(seeds)
    for load in loads:
        for seed in seeds:
            trace = with_poisson_arrivals(base, load * capacity, seed)
            point: dict[str, Any] = {"load": load, "seed": seed, "rate_req_s": load * capacity}
            for policy in policies:
                runs += 1
                t = time.perf_counter()
                engine_policy, overrides = POLICY_ENGINES[policy]
                engine = LLMEngine(model, tokenizer, policy=engine_policy, **{**online_kw, **overrides})
                r = online(engine, trace)
                progress.log(f"{label} {runs}/{total}: load {load:.2f} seed {seed} {policy}: "
                             f"mean JCT {np.mean(r['jct']):.2f} s ({time.perf_counter() - t:.1f} s)")
                point[policy] = run_stats(r, short_len)
            points.append(point)
    return points


def summarize_sweep(points: list[dict[str, Any]]) -> dict[float, dict[str, float]]:
    """Per load: the median over seeds of each policy's statistics (see ``run_stats``), and
    ``jct_mean_ratio_bound``: the most any policy could cut fcfs's mean JCT by removing all
    waiting before the first token, fcfs mean JCT / (fcfs mean JCT - fcfs mean TTFT). The rest
    of a JCT is prefill and decoding at the batch's step time, which no order removes.
    ``jct_gain_captured``: how much of that mlfq reached (``gain_captured``). Where the points
    have "fcfs-swap" too, the same two against it (``..._vs_fcfs_swap``)."""
    by_load: dict[float, dict[str, float]] = {}
    for load in sorted({p["load"] for p in points}):
        at = [p for p in points if p["load"] == load]
        policies = [k for k in POLICY_ENGINES if all(k in p for p in at)]
        keys = [k for k in at[0][POLICIES[0]] if all(k in p[policy] for p in at for policy in policies)]
        row = {f"{k}_{policy}": statistics.median(p[policy][k] for p in at)
               for policy in policies for k in keys}
        for base, suffix in (("fcfs", ""), ("fcfs-swap", "_vs_fcfs_swap")):
            if base not in policies:
                continue
            row[f"jct_mean_ratio_bound{suffix}"] = bound = statistics.median(
                p[base]["jct_mean"] / max(p[base]["jct_mean"] - p[base]["ttft_mean"], 1e-9) for p in at)
            row[f"jct_gain_captured{suffix}"] = gain_captured(
                row[f"jct_mean_{base}"] / row["jct_mean_mlfq"], bound)
        by_load[load] = row
    return by_load


def gain_captured(ratio: float, bound: float) -> float | None:
    """The share of the no-wait bound's gain a policy reached: (fcfs/mlfq - 1) / (bound - 1).
    None where fcfs barely waits (bound within 1% of 1: no gain to capture)."""
    return (ratio - 1.0) / (bound - 1.0) if bound > 1.01 else None


def knee_load(by_load: dict[float, dict[str, float]], factor: float = 3.0) -> float:
    """The lowest load at which a queue builds: fcfs's mean TTFT reaches ``factor`` times its
    value at the lightest load. The highest load if none does (no queue anywhere)."""
    loads = sorted(by_load)
    base = by_load[loads[0]]["ttft_mean_fcfs"]
    return next((x for x in loads[1:] if by_load[x]["ttft_mean_fcfs"] >= factor * base), loads[-1])


def scenario_trace(cfg: ModelConfig, scenario: OnlineScenario, seed: int
                   ) -> tuple[list[TraceRequest], dict[str, Any]]:
    """The scenario's requests (before arrival times) and its engine settings."""
    half = min(512, cfg.max_seq_len // 2)
    base = make_trace(scenario.requests, cfg.vocab_size, seed + 1, max_prompt=half, max_out=half)
    return base, scenario.engine_kw(2 * half)


def run_scenarios(model: torch.nn.Module, tokenizer, cfg: ModelConfig,
                  scenarios: tuple[OnlineScenario, ...], seeds: tuple[int, ...], seed: int,
                  progress: Progress) -> dict[str, dict[str, Any]]:
    """Every scenario in order, by name; one that names ``capacity_of`` reuses that capacity."""
    done: dict[str, dict[str, Any]] = {}
    for sc in scenarios:
        capacity = done[sc.capacity_of]["capacity_req_s"] if sc.capacity_of else None
        done[sc.name] = run_scenario(model, tokenizer, cfg, sc, seeds, seed, progress, capacity)
    return done


def run_scenario(model: torch.nn.Module, tokenizer, cfg: ModelConfig, scenario: OnlineScenario,
                 seeds: tuple[int, ...], seed: int, progress: Progress,
                 capacity: float | None = None) -> dict[str, Any]:
    """Capacity (measured unless given), then the sweep; the scenario's summary with every
    run's numbers."""
    base, kw = scenario_trace(cfg, scenario, seed)
    label = f"online {scenario.name}"
    if capacity is None:
        t = time.perf_counter()
        # Prefix caching off for this one: the second pass must not reuse the first one's prompts.
        capacity = measured_capacity(LLMEngine(model, tokenizer, policy="fcfs", enable_prefix_caching=False,
                                               **kw), base)
        progress.add(f"{label} capacity", time.perf_counter() - t)
    least = expected_sweep_seconds(scenario.requests, capacity, scenario.loads, seeds, scenario.policies)
    progress.log(f"{label}: {scenario.about}; capacity {capacity:.2f} req/s; the sweep takes at "
                 f"least {least:.0f} s ({len(scenario.policies) * len(scenario.loads) * len(seeds)} runs "
                 f"of {scenario.requests} requests: {', '.join(scenario.policies)}) plus each run's drain")
    t = time.perf_counter()
    points = load_sweep(model, tokenizer, base, capacity, scenario.loads, seeds, kw, progress, label,
                        scenario.policies)
    progress.add(f"{label} sweep", time.perf_counter() - t)
    by_load = summarize_sweep(points)
    return {"about": scenario.about, "capacity_req_s": capacity, "saturation_load": knee_load(by_load),
            "by_load": {str(k): v for k, v in by_load.items()}, "runs": points,
            "max_num_seqs": scenario.max_num_seqs, "num_blocks": kw.get("num_blocks"),
            "requests": scenario.requests, "loads": list(scenario.loads),
            "policies": list(scenario.policies), "capacity_of": scenario.capacity_of}


def plot_jct_vs_load(sweeps: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Per scenario (a row each): mean and p99 JCT and mean TTFT against load, fcfs vs mlfq
    (median over seeds, min-max band), as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(len(sweeps), 3, figsize=(14, 4 * len(sweeps)), dpi=110, squeeze=False)
    panels = (("jct_mean", "mean JCT"), ("jct_p99", "p99 JCT"), ("ttft_mean", "mean TTFT"))
    for axes, (name, points) in zip(grid, sweeps.items()):
        loads = sorted({p["load"] for p in points})
        policies = [k for k in POLICY_ENGINES if all(k in p for p in points)]
        for ax, (key, title) in zip(axes, panels):
            for policy in policies:
                vals = [[p[policy][key] for p in points if p["load"] == x] for x in loads]
                ax.plot(loads, [statistics.median(v) for v in vals], marker="o", label=policy)
                ax.fill_between(loads, [min(v) for v in vals], [max(v) for v in vals], alpha=0.2)
            ax.set_xlabel("load (fraction of measured capacity)")
            ax.set_ylabel("seconds")
            ax.set_title(f"{name}: {title}")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
