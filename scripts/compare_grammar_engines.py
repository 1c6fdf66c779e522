"""One-off: xgrammar vs llguidance on this CPU (the measurement behind docs/serving.md's choice).

Neither peer library is installed into the project's venv for this: put them in side folders,
    .venv/bin/pip install --target /tmp/gl llguidance
    .venv/bin/pip install --no-deps --target /tmp/xgt xgrammar apache-tvm-ffi
then run ``.venv/bin/python scripts/compare_grammar_engines.py [VOCAB]``. Same byte-level BPE
tokenizer for both, a 20-field bounded schema, random walks through the grammar (each step:
compute the mask, pick a random allowed token, advance), 5 seeds; reports cold compile time,
median mask time per token and whether every output is valid JSON with every field.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time

sys.path[:0] = ["/tmp/xgt", "/tmp/gl"]

import torch  # noqa: E402

from fastserve_ray.bench.structured import twenty_field_schema  # noqa: E402
from fastserve_ray.data.corpus import builtin_documents  # noqa: E402
from fastserve_ray.tokenizer import train_tokenizer  # noqa: E402

VOCAB = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
SCHEMA = twenty_field_schema()


def walk(mask, consume, eos: int, rng: random.Random, max_steps: int = 800) -> tuple[list[int], list[float]]:
    ids, times = [], []
    for _ in range(max_steps):
        t0 = time.perf_counter()
        allowed = mask()
        times.append(time.perf_counter() - t0)
        choice = rng.choice(allowed)
        ids.append(choice)
        if choice == eos:
            break
        consume(choice)
    return ids, times


def allowed_of(logits: torch.Tensor) -> list[int]:
    return torch.nonzero(logits[0] > -1).flatten().tolist()


def xgrammar_run(hf, vocab: int, eos: int, seed: int):
    import xgrammar as xgr

    info = xgr.TokenizerInfo([hf.id_to_token(i) for i in range(vocab)], vocab_type=xgr.VocabType.BYTE_LEVEL,
                             vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - t0
    m = xgr.GrammarMatcher(compiled)
    bm = xgr.allocate_token_bitmask(1, vocab)

    def mask() -> list[int]:
        m.fill_next_token_bitmask(bm)
        logits = torch.zeros(1, vocab)
        xgr.apply_token_bitmask_inplace(logits, bm)
        return allowed_of(logits)

    return compile_s, *walk(mask, m.accept_token, eos, random.Random(seed))


def llguidance_run(hf, vocab: int, eos: int, seed: int):
    import llguidance
    import llguidance.torch as lgt

    from fastserve_ray.structured.spec import JSON_OPTIONS

    tok = llguidance.LLTokenizer(hf.to_str(), n_vocab=vocab, eos_token=eos)
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults=JSON_OPTIONS)
    m = llguidance.LLMatcher(tok, grammar)
    compile_s = time.perf_counter() - t0
    bm = lgt.allocate_token_bitmask(1, vocab)

    def mask() -> list[int]:
        lgt.fill_next_token_bitmask(m, bm, 0)
        bits = ((bm[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab]
        return torch.nonzero(bits).flatten().tolist()

    return compile_s, *walk(mask, m.consume_token, eos, random.Random(seed))


def main() -> None:
    tok = train_tokenizer([d.text for d in builtin_documents("docs+code")] * 3, vocab_size=VOCAB)
    vocab, eos = tok.hf.get_vocab_size(), tok.eos_id
    print(f"vocabulary {vocab}, EOS {eos}")
    for name, run in (("xgrammar", xgrammar_run), ("llguidance", llguidance_run)):
        compiles, masks, valid = [], [], 0
        for seed in range(5):
            compile_s, ids, times = run(tok.hf, vocab, eos, seed)
            compiles.append(compile_s)
            masks.append(statistics.median(times))
            text = tok.decode([i for i in ids if i != eos])
            try:
                valid += set(json.loads(text)) == set(SCHEMA["properties"])
            except json.JSONDecodeError as e:
                bad = [hex(ord(c)) for c in text if ord(c) < 0x20]
                print(f"  {name} seed {seed}: invalid JSON ({e}); control characters {bad}")
        print(f"{name}: compile {statistics.median(compiles) * 1e3:.1f} ms, mask "
              f"{statistics.median(masks) * 1e6:.0f} us/token, valid {valid}/5")


if __name__ == "__main__":
    main()
