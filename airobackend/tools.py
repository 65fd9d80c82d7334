"""OpenAI tool calling with llama.cpp's "generic" format, for prompt templates that have no tool syntax of their own.

llama.cpp's server (common/chat.cpp `common_chat_params_init_generic` and `common_chat_parse_generic`, with the
tool polyfills of common/minja/chat-template.hpp, commit c392e509) does this when a template cannot express tools:

* the prompt: a system message asks for JSON, "either with `tool_call` (a request to call tools) or with `response`
  reply to the user's request", and lists the tools as JSON; earlier assistant tool calls become JSON text of the
  assistant turn (`{"tool_calls": [{"name", "arguments", "id"}], "content"}`) and tool results become user turns
  (`{"tool_response": {"content", "name", "tool_call_id"}}`), so any template can show them;
* the output: a grammar from the JSON schema ``{"tool_call": {"name": <one of the tools>, "arguments": <its
  parameters schema>}}`` (``{"tool_calls": [...]}`` with parallel calls), or with tool_choice `auto` that or
  ``{"response": "<text>"}``: the model's answer always parses, and its arguments always validate;
* the answer: `tool_call(s)` become OpenAI `tool_calls` (finish_reason "tool_calls"), `response` the content.

What this module adds to that: a named function in `tool_choice` restricts the grammar to that tool; call ids are
generated here (the model is not asked to invent them); `ToolCallStream` turns the growing JSON text into OpenAI's
streamed deltas (the call's name first, then its arguments in pieces), and the streamed pieces concatenate to
exactly the non-streamed `arguments` string (the model's JSON with the whitespace between tokens removed).
"""
from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from airobackend.errors import RequestError
from airobackend.json_schema import SchemaError, schema_to_grammar

INSTRUCTION = ("Respond in JSON format, either with `tool_call` (a request to call tools) or with `response` "
               "reply to the user's request")
TOOLS_PREAMBLE = "You can call any of the following tools to satisfy the user's requests: "
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_TOOLS = 128
CHOICES = ("auto", "none", "required")


class ToolError(RequestError):
    """A `tools` / `tool_choice` / tool message that cannot be honoured; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolSpec:
    """The validated `tools`, `tool_choice` and `parallel_tool_calls` of one chat request."""

    tools: tuple[dict, ...]               # OpenAI tool objects, {"type": "function", "function": {...}}
    choice: str = "auto"                  # auto | none | required
    name: Optional[str] = None            # a named function forced by tool_choice
    parallel: bool = False

    @property
    def active(self) -> bool:
        """Whether the answer is generated under the tool grammar (and parsed for calls)."""
        return self.choice != "none"

    def grammar(self, response_schema: Optional[dict] = None) -> str:
        """The GBNF grammar of the answer (llama.cpp's generic schema); SchemaError names the tool at fault."""
        calls = []
        for i, tool in enumerate(self.tools):
            fn = tool["function"]
            if self.name is not None and fn["name"] != self.name:
                continue
            calls.append({"type": "object",
                          "properties": {"name": {"type": "string", "const": fn["name"]},
                                         "arguments": fn.get("parameters") or {"type": "object", "properties": {}}},
                          "required": ["name", "arguments"]})
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.parallel:
            call = {"type": "object", "properties": {"tool_calls": {"type": "array", "items": one, "minItems": 1}},
                    "required": ["tool_calls"]}
        else:
            call = {"type": "object", "properties": {"tool_call": one}, "required": ["tool_call"]}
        schema = call
        if self.choice == "auto" and self.name is None:
            response = {"type": "object", "properties": {"response": response_schema or {"type": "string"}},
                        "required": ["response"]}
            schema = {"anyOf": [call, response]}
        try:
            return schema_to_grammar(schema, param="tools")
        except SchemaError as e:
            raise ToolError(str(e).replace("json schema", "tool parameters schema", 1), "tools") from None

    def prepare(self, messages: Sequence[Mapping[str, Any]], default_system: str = "") -> list[dict]:
        """The messages with llama.cpp's generic instruction added (when the answer is a tool grammar's)."""
        out = [dict(m) for m in messages]
        return add_system(out, INSTRUCTION, default_system) if self.active else out


def parse_tools(tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None) -> Optional[ToolSpec]:
    """Validate OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`; None when there are no tools.

    Raises ToolError (param "tools", "tool_choice" or "parallel_tool_calls") for anything malformed, an unknown
    function name in tool_choice, or a tool_choice that needs tools when none are given."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise ToolError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise ToolError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects", "tools")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"'tools' has {len(tools)} entries; at most {MAX_TOOLS} are allowed", "tools")
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"'tools[{i}]'"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ToolError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}} "
                            f"(only function tools are supported)", "tools")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f"{where}.function must be an object", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.'", "tools")
        if name in names:
            raise ToolError(f"{where}: the function name {name!r} is used twice", "tools")
        names.add(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ToolError(f"{where}.function.description must be a string", "tools")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object", "tools")
        out.append({"type": "function", "function": {k: copy.deepcopy(v) for k, v in fn.items()
                                                      if k in ("name", "description", "parameters", "strict")}})
    name = None
    if tool_choice is None:
        choice = "auto"
    elif isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise ToolError(f"'tool_choice' must be one of {', '.join(CHOICES)} or a named function", "tool_choice")
        choice = tool_choice
    elif isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise ToolError("'tool_choice' must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                            "tool_choice")
        if name not in names:
            raise ToolError(f"'tool_choice' names {name!r}, which is not among the tools", "tool_choice")
        choice = "required"
    else:
        raise ToolError("'tool_choice' must be a string or an object", "tool_choice")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    return ToolSpec(tools=tuple(out), choice=choice, name=name, parallel=bool(parallel_tool_calls))


# ---------------------------------------------------------------------------------------------- the prompt

def add_system(messages: list[dict], text: str, default_system: str = "") -> list[dict]:
    """Append `text` to the first system message (minja's add_system), or put one first: the template's default
    system prompt followed by `text`, so that a template's preamble is not lost."""
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{_text(first.get('content'))}\n\n{text}"
        return [first, *messages[1:]]
    return [{"role": "system", "content": f"{default_system}\n\n{text}" if default_system else text}, *messages]


def has_tool_messages(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(isinstance(m, Mapping) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)


def polyfill_messages(messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[dict]] = None,
                      default_system: str = "", *, calls: bool = True, responses: bool = True) -> list[dict]:
    """Messages for a template without tool syntax (minja's polyfills): the tools listed in the system message,
    assistant tool calls and tool results written as JSON text in user/assistant turns. `calls` / `responses`
    False leave the tool calls / tool results to a template that shows them itself."""
    out = [dict(m) if isinstance(m, Mapping) else m for m in messages]
    if tools:
        out = add_system(out, TOOLS_PREAMBLE + json.dumps(list(tools), indent=2, ensure_ascii=False),
                         default_system)
    result = []
    for m in out:
        if not isinstance(m, dict):
            result.append(m)
            continue
        role = m.get("role")
        if calls and m.get("tool_calls"):
            calls = []
            for tc in m["tool_calls"]:
                fn = tc.get("function") or {}
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError:
                        pass                       # shown as the string it is, as minja does
                call = {"name": fn.get("name"), "arguments": args}
                if tc.get("id"):
                    call["id"] = tc["id"]
                calls.append(call)
            obj: dict[str, Any] = {"tool_calls": calls}
            if _text(m.get("content")):
                obj["content"] = _text(m.get("content"))
            m = {"role": role, "content": json.dumps(obj, indent=2, ensure_ascii=False)}
        elif responses and role == "tool":
            resp: dict[str, Any] = {"content": _text(m.get("content"))}
            if m.get("name"):
                resp["name"] = m["name"]
            if m.get("tool_call_id"):
                resp["tool_call_id"] = m["tool_call_id"]
            m = {"role": "user", "content": json.dumps({"tool_response": resp}, indent=2, ensure_ascii=False)}
        result.append(m)
    return result


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


# ---------------------------------------------------------------------------------------------- the answer

def answer_message(text: str, spec: Optional[ToolSpec]) -> tuple[dict, bool]:
    """The OpenAI assistant message of a whole answer, and whether it carries tool calls."""
    if spec is None:
        return {"role": "assistant", "content": text}, False
    ts = ToolCallStream(spec)
    ts.feed(text)
    content, calls = ts.message()
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message, bool(calls)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class _Frame:
    kind: str                    # "obj" | "arr"
    key: Any = None              # the current key (obj) or index (arr)
    state: str = "start"         # obj: start, key, colon, value, comma; arr: start, value, comma


@dataclass
class ToolCallStream:
    """Reads the model's JSON answer as it grows and turns it into OpenAI chat deltas.

    `feed(text)` returns the deltas the new text completes: ``{"content": "..."}`` for a `response`, and for a
    call first ``{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}``
    then ``{"tool_calls": [{"index", "function": {"arguments": "<piece>"}}]}``. `message()` is the final message
    content and tool calls. Only the shapes `ToolSpec.grammar` produces are read; anything else ends the reading
    (the raw text is then the content)."""

    spec: ToolSpec
    text: list[str] = field(default_factory=list)
    stack: list[_Frame] = field(default_factory=list)
    started: bool = False
    done: bool = False
    broken: bool = False
    in_str: bool = False
    esc: str = ""                # escape sequence being read ("\\", "\\u12", ...)
    sbuf: list[str] = field(default_factory=list)    # the decoded string being read
    scalar: list[str] = field(default_factory=list)  # the number / literal being read
    calls: list[dict] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    raw_value: Optional[int] = None   # stack depth of a value being copied raw (arguments, non-string response)
    raw_target: str = ""             # "args" | "response"
    _out: list[dict] = field(default_factory=list)

    # -- public
    def feed(self, text: str) -> list[dict]:
        self.text.append(text)
        self._out = []
        for c in text:
            if self.broken:
                break
            self._char(c)
        return self._merged()

    @property
    def complete(self) -> bool:
        return self.done and not self.broken

    def message(self) -> tuple[Optional[str], list[dict]]:
        """(content, tool_calls) of the whole answer. An answer that did not parse to the end (cut by max_tokens)
        is returned as its raw text, without tool calls, as llama.cpp does."""
        if not self.complete:
            return "".join(self.text), []
        calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                 for c in self.calls]
        content = "".join(self.content)
        return (None if calls and not content else content), calls

    # -- deltas
    def _emit_content(self, s: str) -> None:
        if s:
            self.content.append(s)
            self._out.append({"content": s})

    def _emit_args(self, s: str) -> None:
        call = self.calls[-1]
        call["arguments"] += s
        self._out.append({"tool_calls": [{"index": call["index"], "function": {"arguments": s}}]})

    def _merged(self) -> list[dict]:
        """Adjacent pieces of the same kind joined (one delta per kind per feed)."""
        out: list[dict] = []
        for d in self._out:
            if out and "content" in d and "content" in out[-1]:
                out[-1] = {"content": out[-1]["content"] + d["content"]}
            elif (out and "tool_calls" in d and "tool_calls" in out[-1]
                  and set(d["tool_calls"][0]) == {"index", "function"}
                  and set(out[-1]["tool_calls"][0]) == {"index", "function"}
                  and d["tool_calls"][0]["index"] == out[-1]["tool_calls"][0]["index"]):
                prev = out[-1]["tool_calls"][0]["function"]["arguments"]
                out[-1] = {"tool_calls": [{"index": d["tool_calls"][0]["index"],
                                           "function": {"arguments": prev + d["tool_calls"][0]["function"]
                                                        ["arguments"]}}]}
            else:
                out.append(d)
        return out

    # -- the scanner
    def _path(self) -> tuple:
        return tuple(f.key for f in self.stack)

    def _char(self, c: str) -> None:
        raw = self.raw_value is not None
        if self.in_str:
            if raw:
                self._raw(c)
            self._string_char(c)
            return
        if self.scalar:
            if c.isalnum() or c in "+-.":
                self.scalar.append(c)
                if raw:
                    self._raw(c)
                return
            self.scalar = []
            self._value_done()
            if self.broken:
                return
            raw = self.raw_value is not None
        if c in " \t\r\n":
            return
        if self.done:
            self.broken = True
            return
        top = self.stack[-1] if self.stack else None
        if top is not None and top.kind == "obj" and top.state in ("start", "comma_key"):
            if c == '"':
                self.in_str, self.sbuf = True, []
                top.state = "key"
                if raw:
                    self._raw(c)
            elif c == "}" and top.state == "start":
                self._close()
            else:
                self.broken = True
            return
        if top is not None and top.kind == "obj" and top.state == "colon":
            if c == ":":
                top.state = "value"
                if raw:
                    self._raw(c)
            else:
                self.broken = True
            return
        if top is not None and top.state == "comma":
            if c == ",":
                if top.kind == "obj":
                    top.state = "comma_key"
                else:
                    top.key += 1
                    top.state = "value"
                if raw:
                    self._raw(c)
            elif c == ("}" if top.kind == "obj" else "]"):
                self._close()
            else:
                self.broken = True
            return
        if top is not None and top.kind == "arr" and top.state == "start" and c == "]":
            self._close()
            return
        self._value_start(c)

    def _raw(self, c: str) -> None:
        if self.raw_target == "args":
            self._emit_args(c)
        else:
            self._emit_content(c)

    def _value_start(self, c: str) -> None:
        path = self._path()
        if self.raw_value is None and self._is_args(path):
            self.raw_value, self.raw_target = len(self.stack), "args"
        elif self.raw_value is None and path == ("response",) and c != '"':
            self.raw_value, self.raw_target = len(self.stack), "response"
        if self.raw_value is not None:
            self._raw(c)
        self.started = True
        if c == "{":
            self.stack.append(_Frame("obj"))
        elif c == "[":
            self.stack.append(_Frame("arr", key=0))
        elif c == '"':
            self.in_str, self.sbuf = True, []
        elif c.isalnum() or c == "-":
            self.scalar = [c]
        else:
            self.broken = True

    def _is_args(self, path: tuple) -> bool:
        return path == ("tool_call", "arguments") or (len(path) == 3 and path[0] == "tool_calls"
                                                     and path[2] == "arguments")

    def _close(self) -> None:
        if self.raw_value is not None:
            self._raw("}" if self.stack[-1].kind == "obj" else "]")
        self.stack.pop()
        self._value_done()

    def _value_done(self) -> None:
        """A value ended at the current path (its container's state moves on)."""
        if self.raw_value is not None and len(self.stack) == self.raw_value:
            self.raw_value = None
        if not self.stack:
            self.done = True
            return
        top = self.stack[-1]
        top.state = "comma"

    def _string_char(self, c: str) -> None:
        if self.esc:
            self.esc += c
            if self.esc[1] == "u":
                if len(self.esc) < 6:
                    return
                ch = chr(int(self.esc[2:], 16)) if all(x in "0123456789abcdefABCDEF" for x in self.esc[2:]) else ""
            else:
                ch = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}.get(c, c)
            self.esc = ""
            self._string_piece(ch)
            return
        if c == "\\":
            self.esc = c
            return
        if c == '"':
            self.in_str = False
            self._string_end()
            return
        self._string_piece(c)

    def _string_piece(self, ch: str) -> None:
        self.sbuf.append(ch)
        top = self.stack[-1] if self.stack else None
        if self.raw_value is None and top is not None and top.state == "value" and self._path() == ("response",):
            self._emit_content(ch)

    def _string_end(self) -> None:
        s = "".join(self.sbuf)
        top = self.stack[-1] if self.stack else None
        if top is not None and top.kind == "obj" and top.state == "key":
            top.key, top.state = s, "colon"
            return
        path = self._path()
        if path in (("tool_call", "name"),) or (len(path) == 3 and path[0] == "tool_calls" and path[2] == "name"):
            call = {"index": len(self.calls), "id": new_call_id(), "name": s, "arguments": ""}
            self.calls.append(call)
            self._out.append({"tool_calls": [{"index": call["index"], "id": call["id"], "type": "function",
                                              "function": {"name": s, "arguments": ""}}]})
        self._value_done()
