"""The benchmarks' request traces: seeded prompts, heavy-tailed output lengths, Poisson arrivals."""

from __future__ import annotations

import dataclasses

import numpy as np

from fastserve_ray.engine import SamplingParams

# Output lengths ~ 8 * (1 + Pareto(alpha)), clipped to the maximum: alpha 0.7 puts ~17% of
# requests above 100 tokens and ~5% at 512, the long jobs that block short ones under fcfs.
PARETO_ALPHA = 0.7


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    prompt: list[int]
    output_len: int
    arrival: float = 0.0  # seconds after the start (online runs)


def make_trace(num: int, vocab_size: int, seed: int, min_prompt: int = 32, max_prompt: int = 512,
               min_out: int = 8, max_out: int = 512) -> list[TraceRequest]:
    """Seeded requests: uniform prompt lengths, heavy-tailed (Pareto) output lengths."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(min_prompt, max_prompt + 1, num)
    outs = np.clip((min_out * (1 + rng.pareto(PARETO_ALPHA, num))).astype(int), min_out, max_out)
    # Ids from 3 upwards: 0-2 are the special tokens of our tokenizer.
    return [TraceRequest(rng.integers(3, vocab_size, int(p)).tolist(), int(o)) for p, o in zip(prompts, outs)]


def with_poisson_arrivals(trace: list[TraceRequest], rate: float, seed: int) -> list[TraceRequest]:
    """The same requests arriving as a Poisson process of ``rate`` requests/s."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(trace))
    times = np.cumsum(gaps) - gaps[0]
    return [dataclasses.replace(r, arrival=float(t)) for r, t in zip(trace, times)]


def trace_params(r: TraceRequest) -> SamplingParams:
    """Greedy, EOS ignored: every request produces exactly its trace length."""
    return SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
