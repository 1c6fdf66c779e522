"""Logprobs as OpenAI gives them: bytes for every token, text offsets, the sampled token in the top.

The in-process server over a random-weight model and a tokenizer trained on text with
multi-byte characters, so tokens that are pieces of a character do come up.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from fastserve_ray.models import build_model, get_preset, save_model_dir
from fastserve_ray.serve.logprobs import LogprobFormatter, TextOffsets
from fastserve_ray.serve.server import LLMServer
from fastserve_ray.tokenizer import train_tokenizer

TEXT = "naïve café — 日本語のテキスト, ✓ done. " * 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> LLMServer:
    tok = train_tokenizer([TEXT, "plain ascii words for the rest of the merges"] * 20, vocab_size=300)
    torch.manual_seed(0)
    model_dir = save_model_dir(tmp_path_factory.mktemp("m") / "mb", build_model(get_preset("tiny")), tok)
    srv = LLMServer(str(model_dir), "mb", {"max_num_seqs": 4})
    yield srv
    srv.engine.shutdown()


def _call(server: LLMServer, kind: str, body: dict) -> dict:
    return asyncio.run(server.generate(kind, {"model": "mb", **body}))


def test_a_split_character_is_counted_once() -> None:
    offsets = TextOffsets(start=3)
    assert [offsets.advance(b) for b in (b"a", b"\xc3", b"\xa9", b"b")] == [3, 4, 4, 5]
    assert offsets.position == 6


def test_completion_logprobs_have_bytes_offsets_and_the_sampled_token(server: LLMServer) -> None:
    prompt = "naïve café"  # echo with logprobs needs the prompt's logprobs: refused for now
    out = _call(
        server,
        "completion",
        {
            "prompt": prompt,
            "max_tokens": 40,
            "logprobs": 1,
            "temperature": 1.5,
            "seed": 3,
            "ignore_eos": True,
        },
    )
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert (
        len(lp["tokens"])
        == len(lp["token_logprobs"])
        == len(lp["top_logprobs"])
        == len(lp["text_offset"])
        == 40
    )
    assert lp["text_offset"][0] == 0
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][-1] <= len(choice["text"])
    # Every token's string is its bytes where those are valid UTF-8 alone, else "bytes:\xNN...".
    assert any(t.startswith("bytes:\\x") for t in lp["tokens"]) or all(t.isprintable() for t in lp["tokens"])
    for token, top, value in zip(lp["tokens"], lp["top_logprobs"], lp["token_logprobs"]):
        assert top.get(token) == value  # sampled at temperature 1.5: not always the most likely
        assert 1 <= len(top) <= 2


def test_chat_logprobs_bytes_rebuild_the_text(server: LLMServer) -> None:
    out = _call(
        server,
        "chat",
        {
            "messages": [{"role": "user", "content": "café?"}],
            "max_tokens": 30,
            "logprobs": True,
            "top_logprobs": 2,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    choice = out["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 30
    data = b"".join(bytes(c["bytes"]) for c in content)
    assert data.decode("utf-8", errors="replace") == choice["message"]["content"]
    for c in content:
        assert all(isinstance(b, int) and 0 <= b < 256 for b in c["bytes"])
        assert c["top_logprobs"][0]["token"] == c["token"]  # greedy: the sampled one is the top
        for t in c["top_logprobs"]:
            shown = bytes(t["bytes"])
            expect = "bytes:" + "".join(f"\\x{b:02x}" for b in shown) if _invalid(shown) else shown.decode()
            assert t["token"] == expect


def test_partial_characters_are_spelled_as_bytes(server: LLMServer) -> None:
    tok = server.tokenizer
    fmt = LogprobFormatter(tok)
    pieces = [i for i in range(tok.vocab_size) if not tok.is_special(i) and _invalid(tok.token_bytes(i))]
    assert pieces  # byte-level BPE over this text has tokens that are parts of characters
    text, data = fmt.token(pieces[0])
    assert text == "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def _invalid(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(server: LLMServer) -> None:
    """lm-eval-harness's loglikelihood request: echo, logprobs, max_tokens 0."""
    prompt = "naïve café — done."
    ids = server._encode(prompt, "prompt")
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    out = _call(server, "completion", body)
    choice = out["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] == len(ids)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    # Each prompt token's logprob is the model's own, from a plain forward over the prompt.
    model = server.engine.engine.runner.model
    with torch.inference_mode():
        ref = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    for j in range(1, len(ids)):
        assert abs(lp["token_logprobs"][j] - ref[j - 1, ids[j]].item()) < 0.05  # bf16 or fp32
        assert lp["top_logprobs"][j][lp["tokens"][j]] == lp["token_logprobs"][j]
    assert lp["text_offset"][0] == 0 and lp["text_offset"][-1] < len(prompt)
    # Echo with logprobs and a generated continuation: the prompt's entries, then the output's.
    more = _call(server, "completion", {**body, "max_tokens": 3, "ignore_eos": True})["choices"][0]
    assert len(more["logprobs"]["tokens"]) == len(ids) + 3 and more["text"].startswith(prompt)
    assert more["logprobs"]["token_logprobs"][1 : len(ids)] == lp["token_logprobs"][1:]
    # Streamed, the first chunk carries the prompt and its logprobs.
    chunks = asyncio.run(_collect_stream(server, {**body, "max_tokens": 2, "ignore_eos": True}))
    first = chunks[0]["choices"][0]
    assert first["text"].startswith(prompt) and first["logprobs"]["token_logprobs"][0] is None
    assert sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks if c.get("choices")) == len(ids) + 2
    err = _call(server, "completion", {"prompt": prompt, "max_tokens": 0})
    assert err["status_code"] == 400 and err["error"]["param"] == "max_tokens"


async def _collect_stream(server: LLMServer, body: dict) -> list[dict]:
    return [c async for c in server.generate_stream("completion", {"model": "mb", "stream": True, **body})]
