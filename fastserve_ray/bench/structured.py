"""Structured outputs under load: json_schema requests against the same requests unconstrained.

The same prompts at the same concurrency through one in-process AsyncLLMEngine, greedy: once
constrained by a 20-field JSON schema, once free with each request's output length fixed to
what its constrained run produced (EOS ignored), so both sides decode exactly the same number
of tokens and the ratio isolates what the grammar costs (masks, matcher updates). Lengths come
from a sizing pass (greedy is deterministic); then the two sides alternate over the
repetitions, warm-up excluded, median and spread reported. Every constrained output is checked:
it must parse and carry every field. ``schema_compile_s``: a cold compile of the schema (fresh
compiler, the tokenizer's grammar view built beforehand and reported apart).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

from fastserve_ray.bench.trace import TraceRequest

TARGET_STRUCTURED_RATIO = 0.9  # structured_tok_s >= 0.9 x plain_tok_s at concurrency 8


def twenty_field_schema() -> dict[str, Any]:
    """A 20-field object of every common kind, each bounded (strings, numbers, arrays)."""
    kinds = [{"type": "string", "maxLength": 12}, {"type": "integer", "minimum": 0, "maximum": 9999},
             {"type": "boolean"}, {"enum": ["low", "medium", "high"]},
             {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3}]
    props = {f"field_{i:02d}": kinds[i % len(kinds)] for i in range(20)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def schema_compile_seconds(tokenizer: Any, vocab_size: int, schema: dict[str, Any], reps: int = 5) -> dict:
    """Cold compile time of ``schema`` (median of ``reps`` fresh compilers) and the set-up time."""
    from fastserve_ray.structured import GrammarCompiler, GrammarSpec

    setup, compile_s = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        compiler = GrammarCompiler(tokenizer, vocab_size)
        t1 = time.perf_counter()
        matcher = compiler.matcher(GrammarSpec.json_schema(schema))
        compiler.fill([matcher])  # the first mask: llguidance builds lexer states lazily
        t2 = time.perf_counter()
        setup.append(t1 - t0)
        compile_s.append(t2 - t1)
    return {"schema_compile_s": statistics.median(compile_s), "schema_compile_runs_s": compile_s,
            "tokenizer_setup_s": statistics.median(setup)}


def run_structured_bench(engine: Any, trace: list[TraceRequest], concurrency: int, reps: int,
                         max_tokens: int) -> dict[str, Any]:
    """Constrained vs unconstrained output tokens/s on ``engine`` (an AsyncLLMEngine)."""
    from fastserve_ray.bench.serve import Run, _drive, _median_run
    from fastserve_ray.engine import SamplingParams
    from fastserve_ray.structured import GrammarSpec

    schema = twenty_field_schema()
    spec = GrammarSpec.json_schema(schema)
    lengths: dict[int, int] = {}
    invalid: list[str] = []

    def request(i: int, r: TraceRequest, structured: bool) -> SamplingParams:
        if structured:
            return SamplingParams(max_tokens=max_tokens, temperature=0.0, structured=spec)
        return SamplingParams(max_tokens=lengths[i], temperature=0.0, ignore_eos=True)

    def make_one(structured: bool, check: bool) -> Any:
        async def one(r: TraceRequest) -> dict[str, Any]:
            i = index[id(r)]
            start, times, tokens, text, reason = time.perf_counter(), [], 0, "", None
            async for out in engine.generate(r.prompt, request(i, r, structured)):
                now = time.perf_counter()
                times.extend([now] * len(out.new_token_ids))
                tokens, reason = out.num_output_tokens, out.finish_reason
                text += out.delta_text
            if structured:
                lengths[i] = tokens
                if check and not _valid(text, reason, schema):
                    invalid.append(text[:200])
            ok = tokens > 0 if structured else tokens == lengths[i]  # validity: counted apart
            return {"ok": ok, "tokens": tokens, "start": start, "times": times, "end": time.perf_counter()}
        return one

    index = {id(r): i for i, r in enumerate(trace)}

    async def main() -> dict[str, list[Run]]:
        await _drive(trace, make_one(True, True), concurrency)  # sizing pass (and the warm-up)
        await _drive(trace[:4], make_one(False, False), 2)  # warm-up of the free side
        runs: dict[str, list[Run]] = {"structured": [], "plain": []}
        for rep in range(reps):
            order = ("structured", "plain") if rep % 2 == 0 else ("plain", "structured")
            for name in order:
                run = await _drive(trace, make_one(name == "structured", False), concurrency)
                runs[name].append(run)
                print(f"[bench serve] structured rep {rep + 1}/{reps} {name:10s}: "
                      f"{run.summary()['tok_s']:6.0f} output tokens/s")
        return runs

    runs = asyncio.run(main())
    structured, structured_spread = _median_run(runs["structured"])
    plain, plain_spread = _median_run(runs["plain"])
    s, p = structured_spread["median"], plain_spread["median"]
    return {"structured_tok_s": s, "plain_tok_s": p, "structured_vs_plain": s / p if p else None,
            "spread_tok_s": {"structured": structured_spread, "plain": plain_spread},
            "structured": structured.summary(), "plain": plain.summary(),
            "outputs_checked": len(trace), "outputs_invalid": len(invalid), "invalid_examples": invalid[:3],
            "mean_output_len": statistics.mean(lengths.values()), "concurrency": concurrency,
            "schema_fields": 20, "target": TARGET_STRUCTURED_RATIO}


def _valid(text: str, reason: str | None, schema: dict[str, Any]) -> bool:
    if reason != "stop":
        return False
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and set(obj) == set(schema["properties"])


def print_structured(r: dict[str, Any]) -> None:
    """One line per figure, after the serve table."""
    sp = r["spread_tok_s"]
    print(f"structured outputs (20-field json_schema, concurrency {r['concurrency']}): "
          f"{r['structured_tok_s']:.0f} vs {r['plain_tok_s']:.0f} output tokens/s unconstrained = "
          f"{r['structured_vs_plain']:.2f}x (target >= {r['target']}); structured "
          f"{sp['structured']['min']:.0f}-{sp['structured']['max']:.0f}, plain "
          f"{sp['plain']['min']:.0f}-{sp['plain']['max']:.0f}; {r['outputs_invalid']}/{r['outputs_checked']} "
          f"invalid; schema compile {r['schema_compile_s'] * 1e3:.1f} ms (tokenizer set-up "
          f"{r['tokenizer_setup_s'] * 1e3:.0f} ms, once per engine)")
