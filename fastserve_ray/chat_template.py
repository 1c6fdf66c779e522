"""Chat templates rendered as transformers renders them: Jinja2, sandboxed, the same helpers.

A model directory's ``tokenizer_config.json`` (or ``chat_template.jinja``) carries the
template a model was tuned with; ``render_chat`` turns OpenAI-style messages into the prompt
text with it. The environment is the one ``transformers.apply_chat_template`` builds, so the
prompt, and after tokenizing with special tokens parsed the token ids, are the same:

- ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with
  ``loopcontrols``: templates come from checkpoints found on the internet, so they run
  sandboxed (no attribute access to Python internals, no mutation of the inputs);
- globals ``raise_exception(message)`` (a TemplateError, which the server turns into a 400
  with the template's message) and ``strftime_now(format)``; the ``tojson`` filter without
  HTML escaping and with ``ensure_ascii=False`` as transformers defines it;
- variables ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the special
  tokens (``bos_token``, ``eos_token``, ...) and any ``chat_template_kwargs``.

``DEFAULT_CHAT_TEMPLATE`` is for tokenizers that come without one (every tokenizer this project
trains): ChatML's layout (``<|im_start|>role\\n...``), with the tokenizer's EOS token closing
each turn, so a model trained on documents that end in EOS also ends its reply there. Given
``tools``, it lists them in a system turn and shows the Hermes / Qwen2 call format
(``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``); assistant ``tool_calls`` in the
history are written in that format, ``tool`` results as turns of role ``tool``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from fastserve_ray.errors import FastServeError

DEFAULT_CHAT_TEMPLATE = (
    # With tools: a system turn first that lists them (one JSON object per line) and shows the
    # call format, the Hermes / Qwen2 one that serve/tool_calls.py parses and enforces.
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' and messages[0]['content'] is string %}"
    "{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more of these functions. Their signatures, one JSON "
    "object per line:\\n<tools>\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    "{{- '</tools>\\n\\nTo call a function, write its name and arguments as a JSON object between "
    "the tags:\\n<tool_call>\\n{\"name\": <function name>, \"arguments\": <arguments object>}"
    "\\n</tool_call>' + eos_token + '\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- endif %}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- if not loop.first or message['content'] %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": ' "
    "+ (call['function']['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- eos_token + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Names the template itself is given; chat_template_kwargs may not replace them.
RESERVED_NAMES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
MAX_RENDERED_CHARS = 4_000_000  # a template that blows a prompt up past this is refused


class ChatTemplateError(FastServeError):
    """The template could not render these messages (its own raise_exception, or a bug in it)."""


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, '); transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def compile_template(source: str) -> Any:
    """The compiled template (cached per source text); ChatTemplateError if it does not parse."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    special_tokens: Mapping[str, str | None] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text for ``messages`` (plain JSON data), as transformers renders it."""
    import jinja2

    extra = dict(template_kwargs or {})
    clash = sorted(RESERVED_NAMES & set(extra))
    if clash:
        raise ChatTemplateError(
            f"chat_template_kwargs may not set {clash[0]!r}: it is the template's own input")
    variables = {**(special_tokens or {}), **extra, "messages": [dict(m) for m in messages],
                 "tools": None if tools is None else [dict(t) for t in tools],
                 "documents": None if documents is None else [dict(d) for d in documents],
                 "add_generation_prompt": add_generation_prompt}
    compiled = compile_template(template)
    try:
        text = compiled.render(**variables)
    except jinja2.exceptions.TemplateError as e:  # raise_exception, undefined calls, sandbox
        raise ChatTemplateError(f"the chat template refused these messages: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as e:
        raise ChatTemplateError(
            f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
    if len(text) > MAX_RENDERED_CHARS:
        raise ChatTemplateError(
            f"the chat template rendered {len(text)} characters (at most {MAX_RENDERED_CHARS})")
    return text
