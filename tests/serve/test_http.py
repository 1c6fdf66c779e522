"""One Serve application on a private local Ray, exercised over real HTTP, the openai client and handles."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
import ray
from ray import serve
from serve_helpers import assert_fast_503s, burst, hang_up_after_first_token, wait_for

from fastserve_ray.engine import LLMEngine, SamplingParams
from fastserve_ray.serve.client import complete_sync, engine_load, get_model_handle, stream_sync
from fastserve_ray.serve.command import deploy, free_port
from fastserve_ray.serve.config import ServeConfig
from fastserve_ray.serve.metrics import METRIC_NAMES, exported_name
from fastserve_ray.serve.protocol import APIError

KEY = "test-key-123"
FAST = {"metrics_interval_s": 0.5, "look_back_period_s": 2.0, "min_replicas": 1, "max_replicas": 1}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, long_model_dir: Path):
    """Two models (the second with a tiny queue, for backpressure, and a context long enough
    for tool definitions) behind one ingress."""
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             _system_config={"metrics_report_interval_ms": 1000})
    cfg = ServeConfig.from_dict({
        "models": [
            {"path": str(tiny_model_dir), "name": "tiny", "engine": {"max_num_seqs": 4},
             "autoscaling": FAST, "health_check_period_s": 1.0},
            {"path": str(long_model_dir), "name": "tiny-b", "engine": {"max_num_seqs": 1, "policy": "mlfq"},
             "max_ongoing_requests": 1, "max_queued_requests": 1, "num_cpus": 0.5, "autoscaling": FAST},
        ],
        "http": {"port": free_port(), "api_key": KEY},
    })
    url = deploy(cfg)
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def http(server: str):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def _assert_error(r: httpx.Response, status: int, param: str | None = "ANY") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "ANY":
        assert err["param"] == param, err
    return err


def test_greedy_http_equals_engine_and_usage(http: httpx.Client, tiny_model_dir: Path) -> None:
    prompt = "The quick brown fox"
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 12,
                                            "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-request-id"] and body["id"].startswith("cmpl-")
    expected = LLMEngine.from_model_dir(tiny_model_dir, max_num_seqs=1).generate(
        prompt, SamplingParams(max_tokens=12, temperature=0))[0]
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["usage"] == {"prompt_tokens": len(expected.prompt_token_ids),
                             "completion_tokens": len(expected.token_ids),
                             "total_tokens": len(expected.prompt_token_ids) + len(expected.token_ids),
                             "prompt_tokens_details": {"cached_tokens": 0}}
    # A list of prompts and token ids: one choice each, same greedy text for the same prompt.
    ids = expected.prompt_token_ids
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": [ids, ids], "max_tokens": 12,
                                            "temperature": 0, "logprobs": 2})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["text"] for c in choices] == [expected.text] * 2
    assert len(choices[0]["logprobs"]["token_logprobs"]) == len(expected.token_ids)


def _sse(lines: list[str]) -> list[dict]:
    data = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_streaming_matches_non_streaming(http: httpx.Client) -> None:
    for kind, path, extra in (("completion", "/v1/completions", {"prompt": "Hello there"}),
                              ("chat", "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "Hello there"}]})):
        body = {"model": "tiny", "max_tokens": 10, "temperature": 0, **extra}
        whole = http.post(path, json=body).json()
        with http.stream("POST", path, json={**body, "stream": True,
                                             "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            chunks = _sse(list(r.iter_lines()))
        assert chunks[-1]["choices"] == []
        streamed_usage, whole_usage = dict(chunks[-1]["usage"]), dict(whole["usage"])
        # The stream ran second: it may find the first's prompt blocks in the prefix cache.
        cached = streamed_usage.pop("prompt_tokens_details")["cached_tokens"]
        assert cached >= whole_usage.pop("prompt_tokens_details")["cached_tokens"]
        assert streamed_usage == whole_usage
        if kind == "chat":
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
            assert text == whole["choices"][0]["message"]["content"]
        else:
            text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
            assert text == whole["choices"][0]["text"]
        assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_openai_client(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny", "tiny-b"]
    c = client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0, seed=1)
    assert c.choices[0].finish_reason in ("length", "stop") and c.usage.completion_tokens <= 6
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=5, temperature=0.8, top_p=0.9, seed=7)
    again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_completion_tokens=5, temperature=0.8, top_p=0.9, seed=7)
    assert chat.choices[0].message.content == again.choices[0].message.content  # seeded sampling
    pieces = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, stream=True)
        if ch.choices]
    assert len(pieces) >= 2
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=4)


def test_openai_client_structured_outputs_and_tools(server: str) -> None:
    """The SDK's own helpers: parse() into a pydantic model, required tools, streamed calls."""
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(min_length=1, max_length=8)
        age: int = Field(ge=0, le=130)
        colour: Literal["red", "green", "blue"]

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    msgs = [{"role": "user", "content": "Who?"}]
    done = client.chat.completions.parse(model="tiny", messages=msgs, response_format=Person,
                                         max_tokens=120)
    assert isinstance(done.choices[0].message.parsed, Person)  # the SDK parsed and validated it
    weather = {"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"enum": ["Oslo", "Rome"]}}, "required": ["city"], "additionalProperties": False}}}
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    chat = client.chat.completions.create(model="tiny-b", messages=msgs, tools=[weather],
                                          tool_choice="required", parallel_tool_calls=False, max_tokens=100,
                                          temperature=0)
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Oslo", "Rome")
    streamed = client.chat.completions.create(model="tiny-b", messages=msgs, tools=[weather],
                                              tool_choice="required", parallel_tool_calls=False,
                                              max_tokens=100, temperature=0, stream=True)
    deltas = [c.choices[0] for c in streamed if c.choices]
    calls = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].function.arguments == call.function.arguments
    assert deltas[-1].finish_reason == "tool_calls"
    # The call and its result go back in the history: the next turn is an answer.
    history = [*msgs, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 3}'}]
    follow = client.chat.completions.create(model="tiny-b", messages=history, tools=[weather], max_tokens=5)
    assert follow.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError) as e:
        bad = {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "strin"}}}}}
        client.chat.completions.create(model="tiny-b", messages=msgs, tool_choice="required", max_tokens=5,
                                       tools=[bad])
    assert e.value.body["param"] == "tools"


def test_langchain_chat_openai_structured_output_and_tools(server: str) -> None:
    """LangChain's ChatOpenAI, as an agent framework drives an OpenAI-compatible server."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: Literal["Oslo", "Rome", "Lima"]
        population_millions: int = Field(ge=0, le=40)

    @tool
    def get_weather(city: Literal["Oslo", "Rome"]) -> str:
        """The current weather of a city."""
        return "sunny"

    llm = ChatOpenAI(model="tiny-b", base_url=f"{server}/v1", api_key=KEY, max_retries=0, temperature=0,
                     max_tokens=100)
    city = llm.with_structured_output(City).invoke("Name a city.")
    assert isinstance(city, City)  # LangChain parsed and validated the JSON
    message = llm.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False).invoke(
        "What is the weather in Oslo?")
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Oslo", "Rome")
    assert get_weather.invoke(call["args"]) == "sunny"  # the arguments fit the tool's own schema


def test_model_routes_over_http(server: str, http: httpx.Client, tiny_model_dir: Path) -> None:
    """Model cards, tokenize / detokenize, embeddings (the openai client), version, health."""
    card = http.get("/v1/models/tiny").json()
    assert card["id"] == "tiny" and card["object"] == "model" and card["max_model_len"] == 256
    assert http.get("/v1/models").json()["data"][0] == card
    _assert_error(http.get("/v1/models/nope"), 404, "model")
    toks = http.post("/tokenize", json={"model": "tiny", "prompt": "Hello world"}).json()
    engine = LLMEngine.from_model_dir(tiny_model_dir, num_blocks=8)
    assert toks["tokens"] == engine.tokenizer.encode("Hello world", add_bos=True)
    back = http.post("/detokenize", json={"model": "tiny", "tokens": toks["tokens"][1:]}).json()
    assert back == {"prompt": "Hello world"}
    _assert_error(http.post("/tokenize", json={"model": "tiny-c", "prompt": "x"}), 404, "model")
    _assert_error(http.post("/detokenize", json={"model": "tiny", "tokens": [-1]}), 400, "tokens")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    emb = client.embeddings.create(model="tiny", input=["Hello world", "Goodbye"])
    here = engine.embed(["Hello world", "Goodbye"])
    for got, want in zip(emb.data, here):
        assert abs(sum(a * b for a, b in zip(got.embedding, want)) - 1.0) < 1e-3  # unit vectors, aligned
    assert emb.usage.prompt_tokens == sum(len(engine.tokenizer.encode(t, add_bos=True))
                                          for t in ("Hello world", "Goodbye"))
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny", input="x", dimensions=3)
    assert e.value.body["param"] == "dimensions"
    assert http.get("/version").json()["version"]
    assert http.get("/health").json() == {"status": "ok"}


HOSTILE = [
    # (content, headers, status, param)
    (b"{not json", {}, 400, None),
    (b"[1, 2, 3]", {}, 400, None),
    (b"\xff\xfe\x00garbage", {}, 400, None),
    (b"[" * 100_000 + b"]" * 100_000, {}, 400, None),
    (json.dumps({"model": "tiny", "prompt": "x"}).encode(), {"content-type": "text/plain"}, 415, None),
    (b'{"model": "tiny", "prompt": "' + b"a" * (2 << 20) + b'"}', {}, 413, None),
    (json.dumps({"prompt": "x"}).encode(), {}, 400, "model"),
    (json.dumps({"model": 5, "prompt": "x"}).encode(), {}, 400, "model"),
    (json.dumps({"model": "unknown", "prompt": "x"}).encode(), {}, 404, "model"),
    (json.dumps({"model": "tiny"}).encode(), {}, 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": ""}).encode(), {}, 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": []}).encode(), {}, 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": {"a": 1}}).encode(), {}, 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": [1, "a"]}).encode(), {}, 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": [10**9]}).encode(), {}, 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "word " * 5000}).encode(), {}, 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 0}).encode(), {}, 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 10**12}).encode(), {}, 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "5"}).encode(), {}, 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": True}).encode(), {}, 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', {}, 400, "temperature"),
    (b'{"model": "tiny", "prompt": "x", "temperature": Infinity}', {}, 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": -0.5}).encode(), {}, 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": "x", "top_p": 0}).encode(), {}, 400, "top_p"),
    (json.dumps({"model": "tiny", "prompt": "x", "top_p": 1.5}).encode(), {}, 400, "top_p"),
    (json.dumps({"model": "tiny", "prompt": "x", "top_k": -5}).encode(), {}, 400, "top_k"),
    (json.dumps({"model": "tiny", "prompt": "x", "seed": -1}).encode(), {}, 400, "seed"),
    (json.dumps({"model": "tiny", "prompt": "x", "stop": [""]}).encode(), {}, 400, "stop"),
    (json.dumps({"model": "tiny", "prompt": "x", "n": 0}).encode(), {}, 400, "n"),
    (json.dumps({"model": "tiny", "prompt": "x", "logprobs": 999}).encode(), {}, 400, "logprobs"),
    (json.dumps({"model": "tiny", "prompt": "x", "stream": "yes"}).encode(), {}, 400, "stream"),
    (json.dumps({"model": "tiny", "prompt": "\udcff lone surrogate"}).encode(), {}, 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "\u202e\x00\ufffd\U0001f600e\u0301" * 3}).encode(), {}, 200,
     None),
]


def test_hostile_inputs_get_4xx_in_openai_shape(http: httpx.Client) -> None:
    for content, headers, status, param in HOSTILE:
        hdrs = {"content-type": "application/json", **headers}
        r = http.post("/v1/completions", content=content, headers=hdrs)
        if status == 200:
            assert r.status_code == 200, r.text
        else:
            _assert_error(r, status, param)
    chat_cases = [({"model": "tiny", "messages": []}, "messages"),
                  ({"model": "tiny", "messages": [{"content": "hi"}]}, "messages"),
                  ({"model": "tiny", "messages": "hi"}, "messages"),
                  ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                    "max_completion_tokens": 10**9}, "max_completion_tokens")]
    for body, param in chat_cases:
        _assert_error(http.post("/v1/chat/completions", json=body), 400, param)
    _assert_error(http.get("/v1/nothing-here"), 404)
    _assert_error(http.get("/v1/completions"), 405)
    # The server survived all of it.
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "still here", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_api_key_on_every_v1_route(server: str) -> None:
    routes = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
              ("GET", "/v1/unknown"), ("GET", "/v1/models/tiny"), ("POST", "/v1/embeddings"),
              ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/version"), ("GET", "/metrics")]
    with httpx.Client(base_url=server, timeout=30) as c:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                r = c.request(method, path, json={"model": "tiny", "prompt": "x"}, headers=headers)
                assert _assert_error(r, 401)["code"] == "invalid_api_key"
        assert c.get("/health").status_code == 200


def test_handles_from_a_ray_task(http: httpx.Client) -> None:
    @ray.remote(num_cpus=0)
    def call() -> tuple[dict, list[dict], str]:
        handle = get_model_handle("tiny")
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
        whole = complete_sync(handle, body)
        chunks = list(stream_sync(handle, {**body, "stream": True}))
        try:
            complete_sync(handle, {**body, "top_p": 7})
            err = ""
        except APIError as e:
            err = f"{e.status_code}:{e.param}"
        return whole, chunks, err

    whole, chunks, err = ray.get(call.remote())
    via_http = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 6,
                                                   "temperature": 0}).json()
    assert whole["choices"][0]["text"] == via_http["choices"][0]["text"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert err == "400:top_p"


def test_client_disconnect_aborts_and_frees_blocks(server: str) -> None:
    handle = get_model_handle("tiny")
    before = engine_load(handle)
    max_tokens = 240  # the whole context left after the prompt: hundreds of engine steps
    hang_up_after_first_token(server, KEY, "tiny", max_tokens)
    load = wait_for(lambda: (s := engine_load(handle))["num_unfinished_requests"] == 0 and s, 30,
                    "the aborted request to leave the engine")
    assert load["kv_cache_usage"] == 0.0
    generated = load["num_generated_tokens"] - before["num_generated_tokens"]
    assert 1 <= generated < max_tokens, generated  # stopped early: aborted, not finished


def test_backpressure_answers_503_fast(server: str) -> None:
    body = {"model": "tiny-b", "prompt": "busy", "max_tokens": 60, "ignore_eos": True}
    for refused in assert_fast_503s(burst(server, KEY, body)):
        assert refused.json()["error"]["code"] == "overloaded"  # the OpenAI error shape


def test_metrics_on_the_metrics_port(http: httpx.Client) -> None:
    """vLLM's metric names (Ray's Serve LLM dashboard reads them) with model_name, in seconds."""
    http.post("/v1/completions", json={"model": "tiny", "prompt": "count me", "max_tokens": 4})
    assert http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "top_p": 0}).status_code == 400
    # The same long prompt twice: the second finds the first's full KV blocks in the prefix cache.
    long_prompt = " ".join(f"word{i}" for i in range(40))
    usages = [http.post("/v1/completions", json={"model": "tiny", "prompt": long_prompt, "max_tokens": 2,
                                                 "n": 3}).json()["usage"] for _ in range(2)]
    assert usages[0]["prompt_tokens"] >= 32 and usages[1]["prompt_tokens_details"]["cached_tokens"] >= 16
    ports = {n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]}
    needed = ["ray_vllm_request_success_total", "ray_vllm_time_to_first_token_seconds_bucket",
              "ray_vllm_kv_cache_usage_perc", "ray_vllm_num_requests_running",
              "ray_vllm_prefix_cache_hits_total", "ray_vllm_request_queue_time_seconds_bucket",
              "ray_vllm_request_decode_time_seconds_bucket", "ray_fastserve_requests_total",
              'ray_fastserve_mlfq_queue_seqs{']

    def scrape() -> str:
        text = ""
        for port in ports:
            text += httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return text if all(n in text for n in needed) else ""

    text = wait_for(scrape, 60, "vLLM-named metrics on the metrics port", interval=1.0)
    lines = text.splitlines()

    def value(name: str, *labels: str) -> float:
        hits = [ln for ln in lines if ln.startswith(name + "{") and all(lb in ln for lb in labels)]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in hits)

    assert value("ray_vllm_request_success_total", 'model_name="tiny"', 'finished_reason="length"') >= 7
    assert value("ray_fastserve_requests_total", 'model_name="tiny"', 'status="400"') >= 1
    assert value("ray_vllm_prefix_cache_hits_total", 'model_name="tiny"') >= 16
    # The panels join on WorkerId (Ray's label) to find each metric's deployment and replica.
    running = [ln for ln in lines if ln.startswith("ray_vllm_num_requests_running{")]
    assert running and all("WorkerId=" in ln for ln in running), running[:2]
    # tiny-b runs MLFQ: one gauge per queue (idle now: all empty); tiny runs FCFS: none.
    queues = [ln for ln in lines if ln.startswith("ray_fastserve_mlfq_queue_seqs{")]
    assert queues and all('model_name="tiny-b"' in ln for ln in queues)
    assert {re.search(r'queue="(\d+)"', ln).group(1) for ln in queues} >= {"0", "1"}
    # The prompt is counted once per request, not once per sample (n = 3 above).
    assert value("ray_vllm_prompt_tokens_total", 'model_name="tiny"') < 4 * usages[0]["prompt_tokens"]
    assert all(name.startswith(("vllm_", "fastserve_")) for name in METRIC_NAMES)
    # Ray's own Serve LLM dashboard: every metric its panels query that we export is on the port,
    # the core ones (load, latency, tokens, prefix cache) among them.
    import ray.dashboard.modules.metrics.dashboards.serve_llm_dashboard_panels as panels

    queried = set(re.findall(r"ray_vllm_[a-z0-9_]+", Path(panels.__file__).read_text()))
    ours = {exported_name(n) for n in METRIC_NAMES if n.startswith("vllm_")}
    covered = {q for q in queried if re.sub(r"_(bucket|sum|count)$", "", q) in ours}
    for name in covered:
        assert any(ln.startswith(name) for ln in lines), name
    core = {"ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting", "ray_vllm_kv_cache_usage_perc",
            "ray_vllm_time_to_first_token_seconds", "ray_vllm_prompt_tokens_total",
            "ray_vllm_generation_tokens_total", "ray_vllm_request_success_total",
            "ray_vllm_prefix_cache_hits_total", "ray_vllm_prefix_cache_queries_total",
            "ray_vllm_e2e_request_latency_seconds", "ray_vllm_request_queue_time_seconds"}
    assert core <= {re.sub(r"_(bucket|sum|count)$", "", q) for q in covered}, core - covered
