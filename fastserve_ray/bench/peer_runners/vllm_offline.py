"""vLLM's offline engine (``LLM.generate``) as a line protocol, run by .venv-peers/bin/python.

argv: a JSON object {"model": HF dir, "dtype": "float32"|"bfloat16", "max_model_len": int,
"max_num_seqs": int, "kv_cache_gib": number}. Then one JSON request per stdin line,
{"prompts": [[ids...], ...], "output_lens": [n, ...]}, answered with one stdout line
{"elapsed_s": s, "output_tokens": n, "output_lens": [...]} (each prefixed with MARK). "ready" is
printed once loaded, so
that the caller can interleave repetitions with its own engine while this process stays warm.
"""

from __future__ import annotations

import json
import os
import sys
import time

MARK = "@@peer "  # vLLM logs to stdout too: our answers are the lines with this prefix


def answer(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def main() -> int:
    cfg = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.get("kv_cache_gib", 2)))
    from vllm import LLM, SamplingParams, __version__

    t0 = time.perf_counter()
    llm = LLM(model=cfg["model"], dtype=cfg["dtype"], max_model_len=cfg["max_model_len"],
              max_num_seqs=cfg["max_num_seqs"], skip_tokenizer_init=True, seed=0,
              enable_prefix_caching=False)
    answer({"ready": True, "version": __version__, "load_s": time.perf_counter() - t0})
    for line in sys.stdin:
        req = json.loads(line)
        prompts = [{"prompt_token_ids": p} for p in req["prompts"]]
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
                  for n in req["output_lens"]]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t
        lens = [len(o.outputs[0].token_ids) for o in outs]
        answer({"elapsed_s": elapsed, "output_tokens": sum(lens), "output_lens": lens})
    return 0


if __name__ == "__main__":
    sys.exit(main())
