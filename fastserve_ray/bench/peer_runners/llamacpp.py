"""llama.cpp (through llama-cpp-python's C API bindings) as a line protocol, run by .venv-peers/bin/python.

argv: a JSON object {"gguf": path, "n_ctx": total KV tokens, "n_seq_max": parallel sequences,
"n_batch": tokens per llama_decode, "threads": n, "kv_type": "f32"|"bf16"|"f16", optional
"kv_unified": bool}. Then one
JSON request per stdin line, answered with one stdout line (each prefixed with MARK):

- {"op": "trace", "prompts": [[ids...]], "output_lens": [n...], "parallel": P} runs the requests
  with up to P sequences decoded together in one llama_batch, the way llama.cpp's own
  `examples/parallel` and llama-server's slots do (decode tokens first, then prompt chunks
  filling the batch, a finished sequence's KV removed and its slot reused at once); greedy
  (argmax of the logits), EOS ignored, fixed output lengths -> {"elapsed_s", "output_tokens",
  "output_lens"}. P = 1 is llama.cpp's batch-1 mode.
- {"op": "decode_steps", "prompt": [ids...], "steps": n} prefills the prompt, then times n
  single-token decode steps -> {"step_s": the median step's seconds} (as our side is timed).
- {"op": "greedy", "prompt": [ids...], "n": n} -> {"tokens": [...]} and
  {"op": "logits", "prompt": [ids...]} -> {"logits": [...]} of the last position (check the conversion).

The sampling is numpy argmax over the logits llama.cpp returns, which costs microseconds per
sequence against milliseconds per decode call.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import deque

import numpy as np

MARK = "@@peer "
KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30}  # GGML_TYPE_*


def answer(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


class Runner:
    def __init__(self, cfg: dict) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(cfg["gguf"].encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {cfg['gguf']}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = cfg["n_ctx"]
        cparams.n_batch = cparams.n_ubatch = cfg["n_batch"]
        cparams.n_seq_max = cfg["n_seq_max"]
        # llama.cpp's own default (llama-server too, unless --kv-unified): a KV stream per sequence
        # holding n_ctx / n_seq_max tokens. A unified pool makes every sequence's attention span
        # every sequence's cells (masked), which costs it several times over at 64 sequences.
        cparams.kv_unified = bool(cfg.get("kv_unified", False))
        cparams.n_threads = cparams.n_threads_batch = cfg["threads"]
        cparams.type_k = cparams.type_v = KV_TYPES[cfg["kv_type"]]
        cparams.flash_attn_type = cfg.get("flash_attn", lc.LLAMA_FLASH_ATTN_TYPE_AUTO)
        cparams.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context with {cfg}")
        self.mem = lc.llama_get_memory(self.ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.n_batch = cfg["n_batch"]
        self.n_seq_max = cfg["n_seq_max"]
        self.batch = lc.llama_batch_init(self.n_batch, 0, 1)

    def _argmax(self, i: int) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(entries)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {len(entries)} tokens")

    def trace(self, prompts: list[list[int]], output_lens: list[int], parallel: int) -> dict:
        if parallel > self.n_seq_max:
            raise ValueError(f"parallel {parallel} > n_seq_max {self.n_seq_max}")
        self.lc.llama_memory_clear(self.mem, True)
        queue = deque(range(len(prompts)))
        free = list(range(parallel))[::-1]
        # seq -> [request, next position, prompt tokens left to feed, tokens produced, last token]
        live: dict[int, list] = {}
        produced = [0] * len(prompts)
        t0 = time.perf_counter()
        while queue or live:
            while queue and free:
                r = queue.popleft()
                live[free.pop()] = [r, 0, list(prompts[r]), 0, -1]
            entries: list[tuple[int, int, int, bool]] = []
            owners: list[int] = []  # seq of each entry that asks for logits
            for seq, st in live.items():  # decodes first: one token each
                if not st[2]:
                    entries.append((st[4], st[1], seq, True))
                    owners.append(seq)
                    st[1] += 1
            for seq, st in live.items():  # then prompt chunks, as many as the batch holds
                room = self.n_batch - len(entries)
                if not st[2] or room <= 0:
                    continue
                chunk, st[2] = st[2][:room], st[2][room:]
                for j, tok in enumerate(chunk):
                    last = not st[2] and j == len(chunk) - 1
                    entries.append((tok, st[1] + j, seq, last))
                    if last:
                        owners.append(seq)
                st[1] += len(chunk)
            self._decode(entries)
            out_idx = [i for i, e in enumerate(entries) if e[3]]
            for i, seq in zip(out_idx, owners, strict=True):
                st = live[seq]
                st[4] = self._argmax(i)
                st[3] += 1
                if st[3] >= output_lens[st[0]]:
                    produced[st[0]] = st[3]
                    self.lc.llama_memory_seq_rm(self.mem, seq, -1, -1)
                    del live[seq]
                    free.append(seq)
        elapsed = time.perf_counter() - t0
        return {"elapsed_s": elapsed, "output_tokens": sum(produced), "output_lens": produced}

    def _prefill(self, prompt: list[int]) -> int:
        self.lc.llama_memory_clear(self.mem, True)
        for start in range(0, len(prompt), self.n_batch):
            chunk = prompt[start:start + self.n_batch]
            self._decode([(t, start + j, 0, start + j == len(prompt) - 1) for j, t in enumerate(chunk)])
        return self._argmax((len(prompt) - 1) % self.n_batch)  # the last token's row in its chunk

    def decode_steps(self, prompt: list[int], steps: int) -> dict:
        tok = self._prefill(prompt)
        times = []
        for k in range(steps):
            t0 = time.perf_counter()
            self._decode([(tok, len(prompt) + k, 0, True)])
            tok = self._argmax(0)
            times.append(time.perf_counter() - t0)
        return {"step_s": statistics.median(times)}

    def logits(self, prompt: list[int]) -> dict:
        self._prefill(prompt)
        ptr = self.lc.llama_get_logits_ith(self.ctx, (len(prompt) - 1) % self.n_batch)
        return {"logits": np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).tolist()}

    def greedy(self, prompt: list[int], n: int) -> dict:
        toks = [self._prefill(prompt)]
        for k in range(n - 1):
            self._decode([(toks[-1], len(prompt) + k, 0, True)])
            toks.append(self._argmax(0))
        return {"tokens": toks}


def main() -> int:
    cfg = json.loads(sys.argv[1])
    import llama_cpp

    t0 = time.perf_counter()
    runner = Runner(cfg)
    answer({"ready": True, "version": llama_cpp.__version__, "load_s": time.perf_counter() - t0,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()})
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        try:
            answer(getattr(runner, op)(**req))
        except Exception as e:  # the caller reports it as this peer's error
            answer({"error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
