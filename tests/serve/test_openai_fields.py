"""Every OpenAI field either works or is a 400 naming it; the API key under any route prefix.

The LLM server runs in-process (no Ray); the ingress middleware is exercised with Starlette's
TestClient under ``root_path`` as Serve's proxy sets it. The same key check over real Serve
HTTP with ``route_prefix: /llm`` is in test_direct.py, and with ``/`` in test_http.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.responses import JSONResponse
from serve_helpers import call_server, stream_server
from starlette.testclient import TestClient

from fastserve_ray.engine import LLMEngine, SamplingParams
from fastserve_ray.serve.ingress import create_app
from fastserve_ray.serve.server import LLMServer

KEY = "k-123"


def _app_with_routes():
    app = create_app(KEY, 1 << 20)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"data": []})

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return app


@pytest.mark.parametrize("prefix", ["", "/llm", "/team/llm"])
def test_api_key_is_needed_on_every_route_under_any_prefix(prefix: str) -> None:
    client = TestClient(_app_with_routes(), root_path=prefix)
    good = {"Authorization": f"Bearer {KEY}"}
    for path in ("/v1/models", "/v1/unknown", "/V1/models", "/metrics", "/"):
        r = client.get(prefix + path)
        assert r.status_code == 401, (prefix, path, r.status_code)
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert client.get(prefix + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get(prefix + "/v1/models", headers=good).status_code == 200
    assert client.get(prefix + "/v1/unknown", headers=good).status_code == 404  # past the key: routing
    assert client.get(prefix + "/health").json() == {"status": "ok"}  # the one open route


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> LLMServer:
    srv = LLMServer(str(tiny_model_dir), "tiny", {"max_num_seqs": 4})
    yield srv
    srv.engine.shutdown()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    return LLMEngine.from_model_dir(tiny_model_dir, max_num_seqs=2)


def _error(out: dict) -> dict:
    assert "error" in out, out
    return out["error"] | {"status": out["status_code"]}


CHAT = [{"role": "user", "content": "hello"}]


def test_null_means_the_default_wherever_openai_allows_it(server: LLMServer) -> None:
    nulls = {k: None for k in ("temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                               "presence_penalty", "frequency_penalty", "logit_bias", "user", "top_k",
                               "min_p", "max_tokens", "response_format", "logprobs")}
    out = call_server(server, "completion", {"prompt": "one", **nulls})
    assert len(out["choices"]) == 1 and out["usage"]["completion_tokens"] >= 1
    out = call_server(server, "chat", {"messages": CHAT, **nulls, "max_tokens": 3, "top_logprobs": None,
                                 "max_completion_tokens": None, "tools": None, "tool_choice": None,
                                 "parallel_tool_calls": None, "metadata": None})
    assert out["choices"][0]["message"]["role"] == "assistant"


def test_unknown_or_unimplemented_fields_are_a_400_naming_them(server: LLMServer) -> None:
    cases = [
        ("completion", {"prompt": "x", "temprature": 0.5}, "temprature"),
        ("completion", {"prompt": "x", "suffix": "end"}, "suffix"),
        ("completion", {"prompt": "x", "best_of": 3}, "best_of"),
        ("completion", {"prompt": "x", "response_format": {"type": "xml"}}, "response_format"),
        ("chat", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
        ("chat", {"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
        ("chat", {"messages": CHAT, "response_format": {"type": "json_schema"}}, "response_format"),
        ("chat", {"messages": CHAT, "echo": True}, "echo"),
        ("chat", {"messages": CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages"),
        ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ]
    for kind, body, param in cases:
        err = _error(call_server(server, kind, body))
        assert err["status"] == 400 and err["param"] == param, (body, err)
        assert param in err["message"] or param == "messages", err
    # Harmless metadata and the neutral values of refused fields are accepted.
    ok = call_server(server, "chat", {"messages": CHAT, "max_tokens": 2, "user": "u1", "metadata": {"a": "b"},
                                "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
                                "store": False, "service_tier": "auto"})
    assert ok["usage"]["completion_tokens"] >= 1
    assert server.load()["num_unfinished_requests"] == 0


def test_sampling_extras_reach_the_engine(server: LLMServer, engine: LLMEngine) -> None:
    ref = engine.generate(["the river"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    base = {"prompt": "the river", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    forced = ref.token_ids[0] + 1
    out = call_server(server, "completion", {**base, "logit_bias": {str(forced): 100}, "logprobs": 0})
    assert out["choices"][0]["logprobs"]["tokens"] == [server.tokenizer.decode([forced])] * 8
    # stop_token_ids: the request ends at the first sampled stop id, which adds no text.
    stop_id = ref.token_ids[3]
    first = ref.token_ids.index(stop_id)
    out = call_server(server, "completion", {**base, "ignore_eos": False, "stop_token_ids": [stop_id]})
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == first + 1
    assert out["choices"][0]["text"] == engine.tokenizer.decode(ref.token_ids[:first])
    # min_p 1.0 keeps only the top token: sampling at any temperature is greedy.
    out = call_server(server, "completion", {**base, "temperature": 1.5, "seed": 3, "min_p": 1.0})
    assert out["choices"][0]["text"] == ref.text
    assert _error(call_server(server, "completion", {**base, "min_p": 2}))["param"] == "min_p"
    bad_bias = call_server(server, "completion", {**base, "logit_bias": {"999999": 1}})
    assert _error(bad_bias)["param"] == "logit_bias"


def test_include_stop_str_in_output_and_skip_special_tokens(server: LLMServer) -> None:
    # Seeded sampling: a varied text (greedy on random weights repeats one token).
    base = {"prompt": "the river", "max_tokens": 16, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    text = call_server(server, "completion", base)["choices"][0]["text"]
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip() and
                text.find(text[i:i + 2]) == i)
    at = text.find(stop)
    base = {**base, "stop": [stop]}
    cut = call_server(server, "completion", base)["choices"][0]
    kept = call_server(server, "completion", {**base, "include_stop_str_in_output": True})["choices"][0]
    assert cut["text"] == text[:at] and cut["finish_reason"] == "stop"
    assert kept["text"] == text[:at + len(stop)] and kept["finish_reason"] == "stop"
    streamed = stream_server(server, "completion", {**base, "include_stop_str_in_output": True})
    assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"]) == kept["text"]
    # A forced special token: left out by default, kept as text with skip_special_tokens false.
    eos = server.tokenizer.eos_id
    forced = {"prompt": "x", "max_tokens": 3, "temperature": 0, "ignore_eos": True,
              "logit_bias": {str(eos): 100}}
    assert call_server(server, "completion", forced)["choices"][0]["text"] == ""
    shown = call_server(server, "completion", {**forced, "skip_special_tokens": False})["choices"][0]["text"]
    assert shown == server.tokenizer.decode([eos], skip_special_tokens=False) * 3
    assert server.load()["num_unfinished_requests"] == 0


def test_echo_puts_the_prompt_before_the_completion(server: LLMServer) -> None:
    base = {"prompt": ["the river", "one"], "max_tokens": 4, "temperature": 0}
    plain = call_server(server, "completion", base)["choices"]
    echoed = call_server(server, "completion", {**base, "echo": True})["choices"]
    for p, a, b in zip(base["prompt"], plain, echoed):
        assert b["text"] == p + a["text"]
    chunks = stream_server(server, "completion", {**base, "echo": True})
    for i, p in enumerate(base["prompt"]):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        text = "".join(c["text"] for c in mine)
        assert text == p + plain[i]["text"]


def test_chat_without_max_tokens_may_use_the_rest_of_the_context(server: LLMServer) -> None:
    out = call_server(server, "chat", {"messages": CHAT, "temperature": 0, "ignore_eos": True})
    used = out["usage"]
    assert out["choices"][0]["finish_reason"] == "length"
    assert used["prompt_tokens"] + used["completion_tokens"] == server.context_limit
    err = _error(call_server(server, "chat", {"messages": CHAT, "max_tokens": 3, "max_completion_tokens": 4}))
    assert err["param"] == "max_tokens" and "disagree" in err["message"]
    # Completions keep OpenAI's default of 16.
    out = call_server(server, "completion", {"prompt": "x", "ignore_eos": True})
    assert out["usage"]["completion_tokens"] == 16


def test_a_repeated_client_request_id_never_collides_in_the_engine(server: LLMServer) -> None:
    body = {"model": "tiny", "prompt": "one", "max_tokens": 6, "temperature": 0, "ignore_eos": True}

    async def run() -> list[dict]:
        return await asyncio.gather(*(server.generate("completion", body, "cmpl-same") for _ in range(3)))

    outs = asyncio.run(run())
    assert [o["id"] for o in outs] == ["cmpl-same"] * 3  # the client's id is echoed
    assert len({o["choices"][0]["text"] for o in outs}) == 1  # each ran to the end on its own
    assert all(o["usage"]["completion_tokens"] == 6 for o in outs)
    assert server.load()["num_unfinished_requests"] == 0
