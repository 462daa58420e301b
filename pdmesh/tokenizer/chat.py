"""Chat conversations and the model's chat template, rendered the way transformers renders it.

``ChatTemplate.render`` matches ``AutoTokenizer.apply_chat_template(..., tokenize=False)``:
the same sandboxed Jinja environment (``trim_blocks``, ``lstrip_blocks``, loop controls), the
same helpers (``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII), the
special tokens (``bos_token``, ``eos_token``, ...) as variables, and ``tools`` / extra kwargs.
Templates are untrusted input from a model repo, hence the immutable sandbox.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox

from pdmesh.errors import InvalidRequestError

ROLES = ("system", "developer", "user", "assistant", "tool")
# Variables the renderer sets itself; template kwargs may not override them.
RESERVED_KWARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str | None = None  # None only for an assistant message that carries tool calls
    name: str | None = None
    tool_calls: tuple[dict[str, Any], ...] | None = None  # OpenAI format, parsed
    tool_call_id: str | None = None  # role "tool": the call this message answers

    def to_template(self) -> dict[str, Any]:
        """The dict a template sees. Unset keys are left out, as transformers does."""
        msg: dict[str, Any] = {"role": self.role, "content": self.content, "name": self.name}
        if self.tool_calls is not None:
            msg["tool_calls"] = [_arguments_as_dict(call) for call in self.tool_calls]
        msg["tool_call_id"] = self.tool_call_id
        return {k: v for k, v in msg.items() if v is not None}


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[ChatMessage, ...]
    tools: tuple[dict[str, Any], ...] | None = None
    add_generation_prompt: bool = True
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # the last message stays open: the model continues it (a prefilled assistant answer)
    continue_final_message: bool = False

    def validate(self) -> None:
        """Raise ``InvalidRequestError`` naming the first bad field."""
        if not self.messages:
            raise InvalidRequestError("messages", "must contain at least one message")
        for i, m in enumerate(self.messages):
            if m.role not in ROLES:
                raise InvalidRequestError(
                    f"messages[{i}].role", f"{m.role!r} is not one of {', '.join(ROLES)}"
                )
            if m.content is None and not (m.role == "assistant" and m.tool_calls):
                raise InvalidRequestError(f"messages[{i}].content", "is required")
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise InvalidRequestError(
                    "continue_final_message",
                    "cannot be combined with add_generation_prompt: the reply continues the "
                    "last message instead of starting a new one",
                )
            if not self.messages[-1].content:
                raise InvalidRequestError(
                    f"messages[{len(self.messages) - 1}].content",
                    "continue_final_message needs a last message with text to continue",
                )
        reserved = RESERVED_KWARGS & set(self.template_kwargs)
        if reserved:
            raise InvalidRequestError(
                "template_kwargs", f"may not set {', '.join(sorted(reserved))}"
            )


class ChatTemplate:
    """One compiled chat template."""

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template does not compile: {e} (line {e.lineno})") from e

    def render(self, request: ChatRequest, special_tokens: Mapping[str, Any]) -> str:
        """The prompt text. A template error (e.g. its own ``raise_exception``) is the request's
        fault: the conversation does not fit the template, so it becomes InvalidRequestError."""
        request.validate()
        variables = {**special_tokens, **request.template_kwargs}
        try:
            text = self._template.render(
                messages=[m.to_template() for m in request.messages],
                tools=list(request.tools) if request.tools is not None else None,
                documents=None,
                add_generation_prompt=request.add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise InvalidRequestError("messages", f"chat template rejected them: {e}") from e
        if request.continue_final_message:
            return _open_final_message(text, request.messages[-1].content or "")
        return text


def _open_final_message(text: str, content: str) -> str:
    # transformers' rule: cut right after the last occurrence of the final message's content
    # (or of it stripped: templates often trim), dropping the end-of-turn the template wrote
    for needle in (content, content.strip()):
        end = text.rfind(needle)
        if needle and end >= 0:
            return text[: end + len(needle)]
    raise InvalidRequestError(
        "continue_final_message",
        "the chat template does not write the final message's content as it is, so it "
        "cannot be left open",
    )


def _arguments_as_dict(call: dict[str, Any]) -> dict[str, Any]:
    # OpenAI sends function.arguments as a JSON string, while HF templates iterate it as a
    # mapping (`arguments | items`); parse it when it is a JSON object, as vLLM does.
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except (json.JSONDecodeError, RecursionError):  # not JSON, or nested past the parser
        return call
    return {**call, "function": {**fn, "arguments": args}} if isinstance(args, dict) else call


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes; templates expect plain JSON.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in
    transformers; rendering only needs its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
