"""Chat templates: the prompt token ids equal transformers' apply_chat_template, every EOS stops.

Two instruct-style tokenizers are built here (no download): a ChatML one with tools in its
template (Qwen2's layout: <|im_start|>/<|im_end|>, bos_token null, two EOS ids in
generation_config.json) and a Llama-3-style one (bos_token, strftime_now, raise_exception,
<|eot_id|> only in generation_config.json). The server runs in-process on tiny models that use
them; import-hf / export-hf carry the side files.
"""

from __future__ import annotations

import asyncio
import json
import pydoc_data.topics
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from fastserve_ray.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, render_chat
from fastserve_ray.models import build_model, get_preset, read_manifest, save_model_dir
from fastserve_ray.models.hf import export_hf, import_hf
from fastserve_ray.serve.server import LLMServer
from fastserve_ray.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CHATML_TEMPLATE = """
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nFunction signatures are inside <tools></tools>:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nCall one with <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}{%- continue %}{%- endif %}
{%- if message.role in ['user', 'system', 'assistant'] %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- else %}
{{- raise_exception('unknown role ' + message.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""

LLAMA3_TEMPLATE = """
{{- bos_token }}
{%- if messages[0].role == 'system' %}
{%- set system = messages[0].content | trim %}
{%- set messages = messages[1:] %}
{%- else %}
{%- set system = '' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Today Date: ' + strftime_now('%d %b %Y') + '\\n\\n' + system + '<|eot_id|>' }}
{%- for message in messages %}
{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}
{{- message.content | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""


def _write_tokenizer(out: Path, specials: list[str], config: dict, eos_ids: list[str]) -> Path:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(sorted(pydoc_data.topics.topics.values())[:20], trainer=trainer)
    out.mkdir(parents=True)
    hf.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **config}))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [hf.token_to_id(t) for t in eos_ids]}))
    return out


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tokenizer(
        tmp_path_factory.mktemp("chatml") / "tok", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"chat_template": CHATML_TEMPLATE, "bos_token": None, "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>"}, ["<|im_end|>", "<|endoftext|>"])


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tokenizer(
        tmp_path_factory.mktemp("llama3") / "tok",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"chat_template": LLAMA3_TEMPLATE, "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        ["<|end_of_text|>", "<|eot_id|>"])


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Wetter für eine Stadt ☀",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATIONS = {
    "single": [{"role": "user", "content": "hello there"}],
    "system": [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "héllo ☃"}],
    "multi_turn": [{"role": "system", "content": "You answer in one line."},
                   {"role": "user", "content": "What is a class?"},
                   {"role": "assistant", "content": "A template for objects."},
                   {"role": "user", "content": "And <|im_start|> in text?"}],
}


def _hf_ids(tok_dir: Path, messages: list[dict], **kwargs: object) -> list[int]:
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def _our_ids(tok_dir: Path, messages: list[dict], **kwargs: object) -> list[int]:
    tok = Tokenizer.load(tok_dir / "tokenizer.json")
    text = render_chat(tok.chat_template, messages, special_tokens=tok.special_tokens, **kwargs)
    return tok.encode_with_special_tokens(text)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_prompt_ids_equal_transformers(family: str, name: str, chatml_dir: Path, llama3_dir: Path) -> None:
    tok_dir = chatml_dir if family == "chatml" else llama3_dir
    messages = CONVERSATIONS[name]
    ours = _our_ids(tok_dir, messages)
    assert ours == _hf_ids(tok_dir, messages)
    tok = Tokenizer.load(tok_dir / "tokenizer.json")
    # The markup became the control tokens (one id each); "<|im_start|>" typed by the user
    # counts too, as transformers parses it (it is text only in a raw completion prompt).
    if family == "chatml":
        start = tok.hf.token_to_id("<|im_start|>")
        typed = sum("<|im_start|>" in m["content"] for m in messages)
        assert ours.count(start) == len(messages) + 1 + typed
    else:
        start = tok.hf.token_to_id("<|start_header_id|>")
        turns = [m for m in messages if m["role"] != "system"]
        assert ours.count(start) == len(turns) + 2 and ours[0] == tok.bos_id


def test_tools_and_template_kwargs_render_as_transformers(chatml_dir: Path) -> None:
    messages = [{"role": "system", "content": "You may call tools."},
                {"role": "user", "content": "Weather in Köln?"},
                {"role": "tool", "content": '{"temp": 21}'}]
    assert _our_ids(chatml_dir, messages, tools=TOOLS) == _hf_ids(chatml_dir, messages, tools=TOOLS)
    ours = _our_ids(chatml_dir, messages[:2], template_kwargs={"enable_thinking": False})
    assert ours == _hf_ids(chatml_dir, messages[:2], enable_thinking=False)
    assert ours != _our_ids(chatml_dir, messages[:2])  # the kwarg reached the template
    tok = Tokenizer.load(chatml_dir / "tokenizer.json")
    text = render_chat(tok.chat_template, messages, tools=TOOLS)
    assert "Wetter für eine Stadt ☀" in text  # tojson keeps non-ASCII, as transformers' does


def test_template_errors_are_clear(llama3_dir: Path) -> None:
    tok = Tokenizer.load(llama3_dir / "tokenizer.json")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(tok.chat_template, bad, special_tokens=tok.special_tokens)
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat("{% for %}", bad)
    with pytest.raises(ChatTemplateError, match="may not set 'messages'"):
        render_chat(DEFAULT_CHAT_TEMPLATE, bad, template_kwargs={"messages": []})
    # The sandbox: no way from a template to Python internals.
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", bad)


def test_special_tokens_and_every_eos_come_from_the_side_files(chatml_dir: Path, llama3_dir: Path) -> None:
    qwen = Tokenizer.load(chatml_dir / "tokenizer.json")
    im_end, eot = qwen.hf.token_to_id("<|im_end|>"), qwen.hf.token_to_id("<|endoftext|>")
    assert qwen.eos_id == im_end and qwen.eos_ids == tuple(sorted({im_end, eot}))
    assert qwen.bos_id is None and qwen.encode("hi", add_bos=True) == qwen.encode("hi")  # bos_token null
    llama = Tokenizer.load(llama3_dir / "tokenizer.json")
    assert llama.hf.token_to_id("<|eot_id|>") in llama.eos_ids
    assert llama.special_tokens["bos_token"] == "<|begin_of_text|>"


def _serve(tok_dir: Path, out: Path) -> LLMServer:
    tok = Tokenizer.load(tok_dir / "tokenizer.json")
    torch.manual_seed(0)
    model_dir = save_model_dir(out, build_model(get_preset("tiny", vocab_size=tok.vocab_size)), tok)
    return LLMServer(str(model_dir), "m", {"max_num_seqs": 2})


def _chat(server: LLMServer, body: dict) -> dict:
    return asyncio.run(server.generate("chat", {"model": "m", **body}))


def test_served_chat_uses_the_template_and_stops_on_every_eos(chatml_dir: Path, llama3_dir: Path,
                                                              tmp_path: Path) -> None:
    for tok_dir, stop_token in ((chatml_dir, "<|im_end|>"), (llama3_dir, "<|eot_id|>")):
        server = _serve(tok_dir, tmp_path / tok_dir.parent.name)
        try:
            messages = CONVERSATIONS["multi_turn"]
            out = _chat(server, {"messages": messages, "max_tokens": 4, "temperature": 0})
            assert out["usage"]["prompt_tokens"] == len(_hf_ids(tok_dir, messages))
            # The model directory kept the side files, listed in its manifest.
            files = read_manifest(tmp_path / tok_dir.parent.name)["files"]
            assert {"tokenizer_config.json", "generation_config.json"} <= set(files)
            # <|eot_id|> is an EOS only by generation_config.json: it ends the reply all the same.
            stop_id = server.tokenizer.hf.token_to_id(stop_token)
            out = _chat(server, {"messages": messages, "max_tokens": 8, "temperature": 0,
                                 "logit_bias": {str(stop_id): 100}})
            choice = out["choices"][0]
            assert choice["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 1
            assert choice["message"]["content"] == ""
            out = _chat(server, {"messages": messages, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                                 "logit_bias": {str(stop_id): 100}})
            assert out["choices"][0]["finish_reason"] == "length"
            err = _chat(server, {"messages": messages, "chat_template_kwargs": {"add_generation_prompt": 1}})
            assert err["status_code"] == 400 and err["error"]["param"] == "chat_template_kwargs"
            err = _chat(server, {"messages": messages, "chat_template": "{{ 1 }}"})
            assert err["status_code"] == 400 and err["error"]["param"] == "chat_template"
        finally:
            server.engine.shutdown()
    llama = _serve(llama3_dir, tmp_path / "llama-bad")
    try:
        err = _chat(llama, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
        assert err["status_code"] == 400 and "alternate" in err["error"]["message"]
    finally:
        llama.engine.shutdown()


def test_our_own_models_chat_through_the_default_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.load(tiny_model_dir / "tokenizer.json")
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE  # written when the tokenizer was trained
    messages = CONVERSATIONS["system"]
    text = render_chat(tok.chat_template, messages, special_tokens=tok.special_tokens)
    assert text == ("<|im_start|>system\n  Be brief.  <|eos|>\n<|im_start|>user\nhéllo ☃<|eos|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.encode_with_special_tokens(text)
    assert ids.count(tok.eos_id) == 2  # each turn closed by the EOS token itself
    # export-hf carries the template: transformers renders the same ids; import-hf keeps it.
    hf_dir = export_hf(tiny_model_dir, tmp_path / "hf")
    assert _hf_ids(hf_dir, messages) == ids
    back = import_hf(hf_dir, tmp_path / "back")
    assert Tokenizer.load(back / "tokenizer.json").chat_template == DEFAULT_CHAT_TEMPLATE
