"""The routes around generation, in process: model card, tokenize, detokenize, embeddings, health.

Over real Serve HTTP (router mode, the openai client's embeddings) they are in test_http.py;
/health turning 503 when a replica's engine dies is in test_direct.py.
"""

from __future__ import annotations

import asyncio
import base64
import math
from pathlib import Path

import numpy as np
import pytest

from fastserve_ray.engine import LLMEngine
from fastserve_ray.engine.process_async_engine import ProcessLLMEngine
from fastserve_ray.serve.server import LLMServer

CHAT = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> LLMServer:
    srv = LLMServer(str(tiny_model_dir), "tiny", {"max_num_seqs": 4})
    yield srv
    srv.engine.shutdown()


def _run(coro):
    return asyncio.run(coro)


def _cosine(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _error(out: dict, status: int = 400) -> dict:
    assert "error" in out and out["status_code"] == status, out
    return out["error"]


def test_tokenize_is_what_generation_sees(server: LLMServer) -> None:
    out = _run(server.tokenize({"model": "tiny", "prompt": "The for statement", "return_token_strs": True}))
    assert out["tokens"] == server._encode("The for statement", "prompt")  # BOS included
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == server.max_model_len
    assert "".join(out["token_strs"]).endswith("The for statement")
    bare = _run(
        server.tokenize({"model": "tiny", "prompt": "The for statement", "add_special_tokens": False})
    )
    assert bare["tokens"] == out["tokens"][1:]
    chat = _run(server.tokenize({"model": "tiny", "messages": CHAT}))
    text = server.tokenizer.decode(chat["tokens"], skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n") and "Hello there" in text
    back = _run(server.detokenize({"model": "tiny", "tokens": bare["tokens"]}))
    assert back == {"prompt": "The for statement"}


def test_bad_tokenize_and_detokenize_requests_are_4xx(server: LLMServer) -> None:
    assert _error(_run(server.tokenize({"model": "nope", "prompt": "x"})), 404)["param"] == "model"
    assert _error(_run(server.tokenize({"model": "tiny"})))["param"] == "prompt"
    assert (
        _error(_run(server.tokenize({"model": "tiny", "prompt": "x", "messages": CHAT})))["param"] == "prompt"
    )
    assert _error(_run(server.tokenize({"model": "tiny", "prompt": "x", "extra": 1})))["param"] == "extra"
    bad_role = {"model": "tiny", "messages": [{"role": "function", "content": "x"}]}
    assert _error(_run(server.tokenize(bad_role)))["param"] == "messages"
    assert _error(_run(server.detokenize({"model": "tiny", "tokens": [10**6]})))["param"] == "tokens"
    assert _error(_run(server.detokenize({"model": "tiny", "tokens": ["a"]})))["param"] == "tokens"


def test_embeddings_are_unit_vectors_independent_of_the_batch(
    server: LLMServer, tiny_model_dir: Path
) -> None:
    texts = ["a short one", "a much longer input that pads the others in its batch", "x"]
    out = _run(server.embeddings({"model": "tiny", "input": texts}))
    vectors = [d["embedding"] for d in out["data"]]
    assert [d["index"] for d in out["data"]] == [0, 1, 2] and out["object"] == "list"
    assert all(len(v) == 64 and math.isclose(np.linalg.norm(v), 1.0, rel_tol=1e-4) for v in vectors)
    ids = [server._encode(t, "input") for t in texts]
    assert out["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    alone = _run(server.embeddings({"model": "tiny", "input": texts[2]}))["data"][0]["embedding"]
    # Padding after it changed nothing (up to the rounding of other shapes: bf16 on some CPUs);
    # pooling a padded position instead would give an unrelated vector.
    assert _cosine(alone, vectors[2]) > 0.999
    assert _cosine(vectors[0], vectors[1]) < 0.99  # different inputs: different vectors
    # Last-token pooling: the normalised final hidden state of the last position, as computed here.
    engine = LLMEngine.from_model_dir(tiny_model_dir, num_blocks=8)
    model = engine.runner.model
    import torch

    with torch.inference_mode():
        h = model.hidden_states(torch.tensor([ids[1]]))[0, -1].float()
    assert _cosine(vectors[1], (h / h.norm()).tolist()) > 0.999
    b64 = _run(server.embeddings({"model": "tiny", "input": [ids[0]], "encoding_format": "base64"}))
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, vectors[0], atol=1e-6)


def test_bad_embedding_requests_are_4xx(server: LLMServer) -> None:
    for body, param in (
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [10**6]}, "input"),
        ({"input": "x", "dimensions": 8}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": ["x"] * 65}, "input"),
        ({"input": "word " * 300}, "input"),
    ):
        assert _error(_run(server.embeddings({"model": "tiny", **body})))["param"] == param, body
    assert _error(_run(server.embeddings({"model": "nope", "input": "x"})), 404)["param"] == "model"


def test_the_engine_process_embeds_the_same_and_health_follows_the_engine(
    tiny_model_dir: Path, server: LLMServer
) -> None:
    engine = ProcessLLMEngine(str(tiny_model_dir), {"max_num_seqs": 2})
    remote = LLMServer(str(tiny_model_dir), "tiny", engine=engine)
    body = {"model": "tiny", "input": ["one input", "and another"]}
    try:
        there = _run(remote.embeddings(body))["data"]
        here = _run(server.embeddings(body))["data"]
        for a, b in zip(there, here):
            assert _cosine(a["embedding"], b["embedding"]) > 0.999
        assert _error(_run(remote.embeddings({"model": "tiny", "input": [10**6]})))["param"] == "input"
        assert _run(remote.health()) == {"status": "ok"}
        card = remote.model_card(123)
        assert card["id"] == "tiny" and card["created"] == 123 and card["max_model_len"] == 256
    finally:
        engine.shutdown()
    dead = _run(remote.health())
    assert _error(dead, 503)["code"] == "engine_dead"
    assert _error(_run(remote.embeddings(body)), 503)["code"] == "engine_dead"
