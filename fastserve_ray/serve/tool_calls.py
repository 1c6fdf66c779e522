"""Tool calling: validated tools, tool_choice, the call grammar, and calls parsed out of text.

Calls are written in the Hermes / Qwen2 form the default chat template teaches and most open
instruct models were tuned on::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Oslo"}}
    </tool_call>

``tool_choice``: ``none`` leaves the output as text; ``auto`` lets the model write text or
calls and parses the calls out (``ToolCallParser``); ``required`` and a named function are
enforced by a grammar (``call_grammar``): one call (or, with ``parallel_tool_calls``, one or
more) whose ``name`` is an allowed tool and whose ``arguments`` match that tool's parameter
schema, then the end of the output.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from fastserve_ray.serve.protocol import APIError
from fastserve_ray.structured import GrammarSpec
from fastserve_ray.structured.spec import JSON_OPTIONS

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    """What the request lets the model do: ``mode`` none / auto / required; ``name``: forced tool."""

    mode: str
    name: str | None = None

    @property
    def forces_a_call(self) -> bool:
        """Whether a grammar makes the output a tool call."""
        return self.mode == "required"


def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI ``tools`` as plain dicts for the chat template; APIError(400, param tools) if bad."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise APIError(f"tools must be a list, got {type(tools).__name__}", param="tools")
    if len(tools) > MAX_TOOLS:
        raise APIError(f"at most {MAX_TOOLS} tools, got {len(tools)}", param="tools")
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - {"type", "function"}:
            raise APIError(f'{where}: a tool must be {{"type": "function", "function": {{...}}}}',
                           param="tools")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise APIError(f"{where}.function must be an object", param="tools")
        extra = sorted(set(fn) - {"name", "description", "parameters", "strict"})
        if extra:
            raise APIError(f"{where}.function.{extra[0][:40]}: unknown field", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise APIError(f"{where}.function.name must be 1 to 64 letters, digits, _ or -, got "
                           f"{str(name)[:70]!r}", param="tools")
        if name in names:
            raise APIError(f"{where}.function.name {name!r} is used by two tools", param="tools")
        names.add(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise APIError(f"{where}.function.description must be a string", param="tools")
        params = fn.get("parameters")
        if params is not None and not (isinstance(params, dict) and params.get("type", "object") == "object"):
            raise APIError(f"{where}.function.parameters must be a JSON schema of an object",
                           param="tools")
        if fn.get("strict") not in (None, True, False):
            raise APIError(f"{where}.function.strict must be true, false or null", param="tools")
        out.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    return out


def tool_choice(choice: Any, tools: list[dict[str, Any]]) -> ToolChoice:
    """The request's ``tool_choice`` (default: auto with tools, none without); APIError if bad."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise APIError(f"tool_choice {choice!r} needs tools", param="tool_choice")
        return ToolChoice(choice)
    if isinstance(choice, dict) and choice.get("type") == "function" and set(choice) == {"type", "function"}:
        fn = choice["function"]
        name = fn.get("name") if isinstance(fn, dict) else None
        known = {t["function"]["name"] for t in tools}
        if not isinstance(name, str) or name not in known:
            raise APIError(f"tool_choice names the function {str(name)[:70]!r}, which is not in tools",
                           param="tool_choice")
        return ToolChoice("required", name)
    raise APIError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                   f'{{"name": ...}}}}, got {json.dumps(choice)[:80]}', param="tool_choice")


def call_grammar(tools: list[dict[str, Any]], choice: ToolChoice, parallel: bool) -> GrammarSpec:
    """The Lark grammar of the calls ``choice`` forces: each a tagged JSON object of a tool."""
    chosen = [t["function"] for t in tools if choice.name in (None, t["function"]["name"])]
    variants = [{
        "type": "object",
        "properties": {"name": {"const": fn["name"]},
                       "arguments": fn.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False,
    } for fn in chosen]
    schema = {"anyOf": variants} if len(variants) > 1 else variants[0]
    schema = {**schema, "x-guidance": JSON_OPTIONS}
    call = f'"{OPEN}\\n" %json {json.dumps(schema, ensure_ascii=False)} "\\n{CLOSE}"'
    repeat = ' ("\\n" call)*' if parallel and choice.name is None else ""
    return GrammarSpec("lark", f"start: call{repeat}\ncall: {call}\n")


def new_call(name: str, arguments: Any) -> dict[str, Any]:
    """An OpenAI tool call (``arguments`` as a JSON string)."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _parse_call(body: str, names: set[str]) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return new_call(obj["name"], args) if isinstance(args, dict) else None


class ToolCallParser:
    """Splits generated text into content and tool calls, incrementally (for streams too).

    ``feed(delta)`` returns the content that is certain to be content (text that may still
    turn out to open ``<tool_call>`` is held back) and the calls completed by this delta;
    ``finish()`` returns what was held back. A tagged block that is not a call of a known tool
    stays content, so nothing the model wrote is lost.
    """

    def __init__(self, tools: list[dict[str, Any]]) -> None:
        self.names = {t["function"]["name"] for t in tools}
        self._buffer = ""
        self._after_call = False  # the newline that separates parallel calls is not content
        self.calls: list[dict[str, Any]] = []

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        """Content that is certainly content, and the calls completed, after ``delta``."""
        self._buffer += delta
        content, calls = "", []
        while True:
            if self._after_call and self._buffer:
                self._after_call = False
                if self._buffer.startswith("\n"):
                    self._buffer = self._buffer[1:]
            start = self._buffer.find(OPEN)
            if start < 0:
                keep = _partial_suffix(self._buffer, OPEN)
                content += self._buffer[: len(self._buffer) - keep]
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
            end = self._buffer.find(CLOSE, start)
            if end < 0:
                content += self._buffer[:start]
                self._buffer = self._buffer[start:]
                break
            call = _parse_call(self._buffer[start + len(OPEN): end].strip(), self.names)
            block_end = end + len(CLOSE)
            if call is None:
                content += self._buffer[:block_end]
            else:
                content += self._buffer[:start]
                calls.append(call)
            self._buffer = self._buffer[block_end:]
            self._after_call = call is not None
        self.calls += calls
        return content, calls

    def finish(self) -> str:
        """The text still held back (an unfinished tag is content after all)."""
        rest, self._buffer = self._buffer, ""
        return rest


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def parse_output(text: str, tools: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole output's content (None when only calls remain) and its tool calls."""
    parser = ToolCallParser(tools)
    content, calls = parser.feed(text)
    content += parser.finish()
    if calls:
        content = content.strip()
    return (content or None) if calls else content, calls


def history_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` for the chat template (arguments as objects)."""
    if not isinstance(calls, list):
        raise APIError(f"{where}.tool_calls must be a list", param="messages")
    out = []
    for j, call in enumerate(calls):
        w = f"{where}.tool_calls.{j}"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function" \
                or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise APIError(f'{w} must be {{"id": ..., "type": "function", "function": {{"name": str, '
                           '"arguments": str}}}}', param="messages")
        try:
            args = json.loads(fn["arguments"])
        except json.JSONDecodeError as e:
            raise APIError(f"{w}.function.arguments is not JSON ({e})", param="messages") from None
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out
