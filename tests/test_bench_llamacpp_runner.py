"""The llama.cpp side of `bench peers`: the runner's own batching loop and the GGUF q/k permutation.

The real llama-cpp-python and gguf live in .venv-peers/ (scripts/setup_peers.sh), which CI does not
build; bench/peers.json is the real comparison, and the bench itself checks each converted file's
logits against our model. Here a stand-in `llama_cpp` module, holding a KV cache per sequence and
refusing any position that does not extend it, isolates the loop we wrote: continuous batching of
parallel sequences, prompt chunks that fill the batch, slots freed and reused, exact output lengths.
"""

from __future__ import annotations

import ctypes
import importlib
import sys
import types

import numpy as np
import pytest

VOCAB = 50


class _Batch:
    def __init__(self, n: int) -> None:
        self.token, self.pos, self.n_seq_id, self.logits = [0] * n, [0] * n, [0] * n, [0] * n
        self.seq_id = [[0] for _ in range(n)]
        self.n_tokens = 0


def _fake_llama_cpp() -> types.ModuleType:
    """llama_cpp's calls the runner makes; the "model" predicts token + 1 (mod VOCAB)."""
    m = types.ModuleType("llama_cpp")
    m.__version__ = "0.0-standin"
    m.LLAMA_FLASH_ATTN_TYPE_AUTO = -1
    state: dict = {"kv": {}, "batches": [], "logits": {}, "removed": []}
    m.state = state
    m.llama_backend_init = lambda: None
    m.llama_print_system_info = lambda: b"CPU : standin"
    m.llama_model_default_params = lambda: types.SimpleNamespace()
    m.llama_model_load_from_file = lambda path, params: object()
    m.llama_context_default_params = lambda: types.SimpleNamespace()

    def init(model, params):
        state["params"] = params
        return object()

    m.llama_init_from_model = init
    m.llama_get_memory = lambda ctx: "mem"
    m.llama_model_get_vocab = lambda model: "vocab"
    m.llama_vocab_n_tokens = lambda vocab: VOCAB
    m.llama_batch_init = lambda n, embd, n_seq_max: _Batch(n)

    def decode(ctx, b):
        assert b.n_tokens <= state["params"].n_batch
        entries = []
        for i in range(b.n_tokens):
            seq, pos = b.seq_id[i][0], b.pos[i]
            cache = state["kv"].setdefault(seq, [])
            assert pos == len(cache), f"seq {seq}: position {pos} does not extend its {len(cache)} tokens"
            cache.append(b.token[i])
            entries.append((b.token[i], pos, seq))
            if b.logits[i]:
                row = (ctypes.c_float * VOCAB)()
                row[(b.token[i] + 1) % VOCAB] = 1.0
                state["logits"][i] = row
        assert sum(map(len, state["kv"].values())) <= state["params"].n_ctx, "KV cells exceeded n_ctx"
        assert len([s for s, c in state["kv"].items() if c]) <= state["params"].n_seq_max
        state["batches"].append(entries)
        return 0

    m.llama_decode = decode
    m.llama_get_logits_ith = lambda ctx, i: ctypes.cast(state["logits"][i], ctypes.POINTER(ctypes.c_float))

    def seq_rm(mem, seq, p0, p1):
        assert (p0, p1) == (-1, -1)
        state["removed"].append(list(state["kv"][seq]))
        state["kv"][seq] = []

    m.llama_memory_seq_rm = seq_rm
    m.llama_memory_clear = lambda mem, data: state["kv"].clear()
    return m


@pytest.fixture
def runner(monkeypatch):
    fake = _fake_llama_cpp()
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    mod = importlib.import_module("fastserve_ray.bench.peer_runners.llamacpp")
    cfg = {"gguf": "m.gguf", "n_ctx": 64, "n_seq_max": 3, "n_batch": 8, "threads": 2, "kv_type": "f32"}
    return mod.Runner(cfg), fake.state


def test_parallel_sequences_share_batches_and_produce_exact_lengths(runner):
    r, state = runner
    prompts = [list(range(1, 12)), [5, 6], list(range(20, 30)), [7], [9, 10, 11]]
    lens = [4, 6, 3, 5, 2]
    out = r.trace(prompts, lens, parallel=3)
    assert out["output_lens"] == lens and out["output_tokens"] == 20
    # each finished request's KV removed (its slot reused), holding its prompt and then the chain
    # its own logits rows predicted (n - 1 tokens fed back: the last sampled one never is)
    expected = sorted(p + [(p[-1] + k) % VOCAB for k in range(1, n)] for p, n in zip(prompts, lens))
    assert sorted(state["removed"]) == expected
    assert max(len(b) for b in state["batches"]) == 8  # prompt chunks filled the batch
    assert any(len({seq for _, _, seq in b}) == 3 for b in state["batches"])  # three decoded together
    assert len(state["batches"]) < sum(map(len, prompts)) + 20  # batched, not one token per call


def test_a_decode_feeds_back_the_token_its_own_logits_chose(runner):
    r, state = runner
    r.trace([[3, 4, 5]], [4], parallel=1)
    fed = [tok for b in state["batches"] for tok, _, _ in b]
    assert fed == [3, 4, 5, 6, 7, 8]  # prompt, then argmax (token + 1) three times; the 4th is not fed


def test_batch_one_never_holds_two_sequences(runner):
    r, state = runner
    r.trace([[1, 2], [3, 4], [5]], [3, 3, 3], parallel=1)
    assert all(len({seq for _, _, seq in b}) == 1 for b in state["batches"])


def test_decode_steps_and_greedy(runner):
    r, state = runner
    assert r.greedy(list(range(1, 10)), 5)["tokens"] == [10, 11, 12, 13, 14]  # prompt of 9 > n_batch 8
    assert r.decode_steps([1, 2, 3], 4)["step_s"] > 0
    assert r.logits([1, 2])["logits"][3] == 1.0
    with pytest.raises(ValueError, match="parallel 4 > n_seq_max 3"):
        r.trace([[1]], [1], parallel=4)


def _rope_half(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    """Hugging Face Llama RoPE: dimension i rotates with i + d/2."""
    d = x.shape[-1]
    freqs = theta ** (-np.arange(0, d, 2) / d) * pos
    cos, sin = np.cos(np.concatenate([freqs, freqs])), np.sin(np.concatenate([freqs, freqs]))
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * cos + rot * sin


def _rope_pairs(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    """ggml's llama RoPE: dimensions 2i and 2i + 1 rotate together."""
    d = x.shape[-1]
    freqs = theta ** (-np.arange(0, d, 2) / d) * pos
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * np.cos(freqs) - b * np.sin(freqs)
    out[..., 1::2] = a * np.sin(freqs) + b * np.cos(freqs)
    return out


def test_the_qk_permutation_keeps_every_attention_score():
    to_gguf = importlib.import_module("fastserve_ray.bench.peer_runners.to_gguf")
    rng = np.random.default_rng(0)
    n_head, n_kv, head_dim, dim = 4, 2, 8, 16
    wq, wk = rng.standard_normal((n_head * head_dim, dim)), rng.standard_normal((n_kv * head_dim, dim))
    x_q, x_k = rng.standard_normal(dim), rng.standard_normal(dim)
    pq, pk = to_gguf.permute(wq, n_head), to_gguf.permute(wk, n_kv)

    def score(rope, q_w, k_w, h: int, pos_q: int, pos_k: int) -> float:
        q = (q_w @ x_q).reshape(n_head, head_dim)[h]
        k = (k_w @ x_k).reshape(n_kv, head_dim)[h // (n_head // n_kv)]
        return float(rope(q, pos_q) @ rope(k, pos_k))

    for pos_q, pos_k in ((5, 2), (17, 17), (40, 0)):
        for h in range(n_head):
            assert score(_rope_pairs, pq, pk, h, pos_q, pos_k) == pytest.approx(
                score(_rope_half, wq, wk, h, pos_q, pos_k), rel=1e-9, abs=1e-9)
    # without the permutation the scores differ: the check above can fail
    assert abs(score(_rope_pairs, wq, wk, 0, 5, 2) - score(_rope_half, wq, wk, 0, 5, 2)) > 1e-3


def test_gguf_tensor_names_follow_llama_cpp():
    to_gguf = importlib.import_module("fastserve_ray.bench.peer_runners.to_gguf")
    assert to_gguf.gguf_name("model.layers.3.self_attn.k_proj.bias") == "blk.3.attn_k.bias"
    assert to_gguf.gguf_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert to_gguf.gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    with pytest.raises(ValueError, match="no GGUF name"):
        to_gguf.gguf_name("model.layers.0.mystery.weight")
