"""Structured outputs and tool calls: a random-weight model's constrained outputs always parse.

The server runs in-process over the real engine and llguidance (no Ray); the same over real
HTTP with the official openai client (``chat.completions.parse``, tools, streamed calls) is in
test_http.py. A model with random weights is the hard case: nothing but the grammar keeps it
on track, so every output that finished with "stop" must parse and validate.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from serve_helpers import call_server, stream_server

from fastserve_ray.engine import LLMEngine, RequestError, SamplingParams
from fastserve_ray.serve.server import LLMServer
from fastserve_ray.serve.tool_calls import ToolCallParser, parse_output, validate_tools
from fastserve_ray.structured import GrammarSpec
from fastserve_ray.structured.spec import MAX_SOURCE_CHARS

CHAT = [{"role": "user", "content": "What is the weather in Oslo?"}]
# Every string and number bounded: a random model must finish inside max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "member": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "score": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "member", "colour", "tags", "score"],
    "additionalProperties": False,
}
TWENTY = {
    "type": "object",
    "additionalProperties": False,
    "required": [f"f{i}" for i in range(20)],
    "properties": {
        f"f{i}": (
            [
                {"type": "integer", "minimum": 0, "maximum": 99},
                {"type": "boolean"},
                {"enum": ["a", "b"]},
                {"type": "string", "maxLength": 3},
            ]
        )[i % 4]
        for i in range(20)
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Oslo", "Rome"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 6}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    return LLMEngine.from_model_dir(tiny_model_dir, max_num_seqs=8)


@pytest.fixture(scope="module")
def server(long_model_dir: Path) -> LLMServer:
    srv = LLMServer(str(long_model_dir), "tiny", {"max_num_seqs": 8})
    yield srv
    srv.engine.shutdown()


def _error(out: dict) -> dict:
    assert "error" in out, out
    assert out["status_code"] == 400, out
    return out["error"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_constrained_output_of_a_random_model_parses(engine: LLMEngine, temperature: float) -> None:
    cases = [
        (GrammarSpec.json_schema(PERSON), lambda t: jsonschema.validate(json.loads(t), PERSON)),
        (GrammarSpec.json_schema(TWENTY), lambda t: jsonschema.validate(json.loads(t), TWENTY)),
        (
            GrammarSpec("regex", r"[a-z]{2,4}-[0-9]{2}"),
            lambda t: re.fullmatch(r"[a-z]{2,4}-[0-9]{2}", t) or 1 / 0,
        ),
        (
            GrammarSpec.choice(["yes", "no", "it depends"]),
            lambda t: t in ("yes", "no", "it depends") or 1 / 0,
        ),
        (
            GrammarSpec("grammar", 'root ::= "(" [0-9] ("+" [0-9]){0,3} ")"'),
            lambda t: re.fullmatch(r"\([0-9](\+[0-9]){0,3}\)", t) or 1 / 0,
        ),
    ]
    prompts = ["The answer", "x", "Here is some JSON:"]
    for spec, check in cases:
        params = SamplingParams(max_tokens=240, temperature=temperature, seed=7, n=2, structured=spec)
        outs = engine.generate(prompts, params)
        assert len(outs) == 6
        for out in outs:
            assert out.finish_reason == "stop", (spec.kind, out.text)
            check(out.text)  # raises when the output does not parse or validate


def test_json_object_outputs_parse_when_they_finish(engine: LLMEngine) -> None:
    params = SamplingParams(
        max_tokens=200, temperature=1.0, seed=3, n=4, structured=GrammarSpec("json_object")
    )
    outs = engine.generate(["A"], params)
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert finished  # a random model does close objects (with seed 3: most of them)
    for o in finished:
        assert isinstance(json.loads(o.text), dict)
    for o in outs:
        assert o.finish_reason in ("stop", "length")  # never an unparseable stop


def test_the_grammar_survives_preemption(tiny_model_dir: Path) -> None:
    # A KV cache this small preempts sequences; recomputed tokens are never re-sampled, so each
    # matcher stays in step with its sequence.
    small = LLMEngine.from_model_dir(tiny_model_dir, max_num_seqs=8, num_blocks=24, block_size=8)
    params = SamplingParams(
        max_tokens=150, temperature=1.0, seed=1, structured=GrammarSpec.json_schema(PERSON)
    )
    outs = small.generate(["tell me"] * 6, params)
    assert small.stats.num_preempted + small.stats.num_swapped_out > 0
    for o in outs:
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), PERSON)


def test_bad_grammars_are_request_errors_naming_the_field(engine: LLMEngine) -> None:
    bad = [
        GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "strin"}}}),
        GrammarSpec.json_schema({"type": "string", "format": "no-such-format"}),
        GrammarSpec.json_schema({"$ref": "#/definitions/missing"}),
        GrammarSpec("regex", "(unclosed"),
        GrammarSpec("grammar", "root ::= ( "),
    ]
    for spec in bad:
        with pytest.raises(RequestError) as e:
            engine.add_request("x", SamplingParams(structured=spec))
        assert e.value.param == "structured_outputs", spec
    with pytest.raises(RequestError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured=GrammarSpec("json_object"))
    assert not engine.has_unfinished()


def test_response_format_and_structured_outputs_on_both_endpoints(server: LLMServer) -> None:
    schema_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    out = call_server(server, "chat", {"messages": CHAT, "response_format": schema_format, "max_tokens": 150})
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), PERSON)
    out = call_server(
        server,
        "chat",
        {
            "messages": CHAT,
            "response_format": {"type": "json_object"},
            "seed": 3,
            "temperature": 1.0,
            "max_tokens": 200,
        },
    )
    if out["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)
    out = call_server(
        server,
        "completion",
        {
            "prompt": "Pick:",
            "structured_outputs": {"choice": ["left", "right"]},
            "max_tokens": 20,
            "n": 3,
            "temperature": 1.0,
            "seed": 1,
        },
    )
    assert {c["text"] for c in out["choices"]} <= {"left", "right"}
    out = call_server(
        server,
        "completion",
        {"prompt": "Id:", "structured_outputs": {"regex": "[A-Z]{3}[0-9]"}, "max_tokens": 20},
    )
    assert re.fullmatch("[A-Z]{3}[0-9]", out["choices"][0]["text"])
    out = call_server(
        server,
        "completion",
        {
            "prompt": "JSON:",
            "structured_outputs": {"json": json.dumps(PERSON)},
            "max_tokens": 150,
            "stream": False,
        },
    )
    jsonschema.validate(json.loads(out["choices"][0]["text"]), PERSON)
    out = call_server(
        server, "completion", {"prompt": "Yes?", "guided_choice": ["yes", "no"], "max_tokens": 5}
    )
    assert out["choices"][0]["text"] in ("yes", "no")
    chunks = stream_server(
        server, "chat", {"messages": CHAT, "response_format": schema_format, "max_tokens": 150}
    )
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))
    jsonschema.validate(json.loads(text), PERSON)


def test_bad_structured_requests_are_400_naming_the_field(server: LLMServer) -> None:
    huge = {
        "type": "object",
        "properties": {
            f"p{i}": {"type": "string", "description": "x" * 50} for i in range(MAX_SOURCE_CHARS // 60)
        },
    }
    cases = [
        (
            "chat",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
            "response_format",
        ),
        (
            "chat",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}},
            "response_format",
        ),
        (
            "chat",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": huge}}},
            "response_format",
        ),
        ("chat", {"response_format": {"type": "json_object", "schema": {}}}, "response_format"),
        ("chat", {"response_format": "json"}, "response_format"),
        ("completion", {"structured_outputs": {"regex": "(", "json": {}}}, "structured_outputs"),
        ("completion", {"structured_outputs": {"regex": "("}}, "structured_outputs"),
        ("completion", {"structured_outputs": {"choice": []}}, "structured_outputs"),
        ("completion", {"structured_outputs": {"json_object": False}}, "structured_outputs"),
        ("completion", {"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
        ("completion", {"structured_outputs": {"jsonn": {}}}, "structured_outputs"),
        ("completion", {"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
        ("completion", {"guided_regex": "[", "max_tokens": 3}, "guided_regex"),
        (
            "completion",
            {"guided_json": {"type": "object"}, "structured_outputs": {"regex": "a"}},
            "guided_json",
        ),
        ("chat", {"response_format": {"type": "json_object"}, "min_tokens": 3}, "min_tokens"),
    ]
    for kind, body, param in cases:
        base = {"messages": CHAT} if kind == "chat" else {"prompt": "x"}
        err = _error(call_server(server, kind, {**base, **body}))
        assert err["param"] == param, (body, err)
        assert len(err["message"]) < 3000


def test_tool_choice_required_and_named_are_enforced(server: LLMServer) -> None:
    tools = [WEATHER, TIME]
    params_of = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for choice, parallel in (
        ("required", True),
        ("required", False),
        ({"type": "function", "function": {"name": "get_time"}}, True),
    ):
        out = call_server(
            server,
            "chat",
            {
                "messages": CHAT,
                "tools": tools,
                "tool_choice": choice,
                "max_tokens": 150,
                "parallel_tool_calls": parallel,
                "temperature": 1.0,
                "seed": 5,
                "n": 2,
            },
        )
        for c in out["choices"]:
            assert c["finish_reason"] == "tool_calls", c
            calls = c["message"]["tool_calls"]
            assert calls and (parallel or len(calls) == 1)
            for call in calls:
                assert call["type"] == "function" and call["id"].startswith("call_")
                name = call["function"]["name"]
                if isinstance(choice, dict):
                    assert name == "get_time"
                jsonschema.validate(json.loads(call["function"]["arguments"]), params_of[name])


def test_streamed_tool_calls_arrive_as_openai_deltas(server: LLMServer) -> None:
    body = {
        "messages": CHAT,
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_tokens": 150,
        "parallel_tool_calls": False,
        "temperature": 0,
    }
    whole = call_server(server, "chat", body)["choices"][0]
    chunks = stream_server(server, "chat", body)
    deltas = [c["choices"][0] for c in chunks if c.get("choices")]
    calls = [tc for d in deltas for tc in d["delta"].get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["index"] == 0
    assert calls[0]["function"] == whole["message"]["tool_calls"][0]["function"]  # greedy: the same call
    assert deltas[-1]["finish_reason"] == "tool_calls"
    assert not "".join(d["delta"].get("content") or "" for d in deltas).strip()


def test_tools_and_their_results_reach_the_template(server: LLMServer) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'},
    }
    messages = [
        *CHAT,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
    ]
    req_ids = server._chat_prompt(_parsed(server, {"messages": messages, "tools": [WEATHER]}))
    prompt = server.tokenizer.decode(req_ids, skip_special_tokens=False)
    assert '"name": "get_weather"' in prompt and "<tools>" in prompt
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>'
        in prompt
    )
    assert '<|im_start|>tool\n{"temp": 3}' in prompt
    none_ids = server._chat_prompt(
        _parsed(server, {"messages": CHAT, "tools": [WEATHER], "tool_choice": "none"})
    )
    assert "<tools>" not in server.tokenizer.decode(none_ids, skip_special_tokens=False)
    out = call_server(server, "chat", {"messages": messages, "tools": [WEATHER], "max_tokens": 5})
    assert out["choices"][0]["message"]["role"] == "assistant"


def _parsed(server: LLMServer, body: dict):
    from fastserve_ray.serve.protocol import ChatCompletionRequest, parse_request
    from fastserve_ray.serve.tool_calls import tool_choice

    req = parse_request(ChatCompletionRequest, {"model": "tiny", **body})
    req._tools = validate_tools(req.tools)
    req._tool_choice = tool_choice(req.tool_choice, req._tools)
    return req


def test_bad_tools_are_400_naming_the_field(server: LLMServer) -> None:
    bad_params = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}},
    }
    cases = [
        ({"tools": [bad_params], "tool_choice": "required"}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            "tools",
        ),
        ({"tools": [{"type": "code_interpreter"}]}, "tools"),
        ({"tools": "get_weather"}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        ({"messages": [{"role": "tool", "content": "3"}]}, "messages"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"type": "function", "function": {"name": "f", "arguments": "{not json"}}
                        ],
                    }
                ]
            },
            "messages",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": []}], "functions": [{"name": "f"}]},
            "functions",
        ),
    ]
    for body, param in cases:
        err = _error(call_server(server, "chat", {"messages": CHAT, **body}))
        assert err["param"] == param, (body, err)


def test_auto_tool_calls_are_parsed_out_of_text() -> None:
    tools = validate_tools([WEATHER])
    text = (
        'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "F"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>'
    )
    content, calls = parse_output(text, tools)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome", "unit": "F"}
    assert content.startswith("Let me check.") and "unknown_tool" in content  # not a known tool: text
    assert parse_output("no calls here <tool", tools) == ("no calls here <tool", [])
    # Fed a character at a time, the stream parser agrees and never leaks a partial tag.
    parser, streamed, got = ToolCallParser(tools), "", []
    for ch in text:
        c, new = parser.feed(ch)
        assert '<tool_call>\n{"name": "get_weather"' not in c
        streamed += c
        got += new
    streamed += parser.finish()
    assert [c["function"] for c in got] == [c["function"] for c in calls]
    assert streamed.strip() == content


def _sentencepiece_style_tokenizer():
    """A Llama-2-style vocabulary built here: ▁ for spaces, <0xNN> byte-fallback tokens, </s>."""
    import string

    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from fastserve_ray.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for ch in ["▁", *(c for c in string.printable if not c.isspace())]:
        vocab.setdefault(ch, len(vocab))
    merges = [("▁", c) for c in string.ascii_lowercase]
    vocab.update({"▁" + c: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    hf.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return Tokenizer(hf)


def test_structured_outputs_with_a_sentencepiece_style_vocabulary() -> None:
    import torch

    from fastserve_ray.models import build_model, get_preset

    tok = _sentencepiece_style_tokenizer()
    assert tok.eos_id == 2 and tok.token_bytes(3 + 0xC3) == b"\xc3"  # byte-fallback tokens are bytes
    torch.manual_seed(0)
    engine = LLMEngine(build_model(get_preset("tiny")).eval(), tok, num_blocks=64)
    spec = GrammarSpec.json_schema(PERSON)
    outs = engine.generate(
        ["Tell me", "x"], SamplingParams(max_tokens=200, temperature=1.0, seed=2, n=2, structured=spec)
    )
    for out in outs:
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), PERSON)
