"""Request body of OpenAI's ``POST /v1/responses``, as pydantic models.

The subset an agent framework needs from a stateless server: text or item input (messages,
earlier function calls and their outputs), ``instructions``, function tools, ``tool_choice``,
``text.format`` for structured output, streaming. The mesh keeps no state between requests:
``store`` true and ``previous_response_id`` are refused (send the whole conversation instead),
as is every field it does not implement (``RequestModel``: a 400 naming it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from services.gateway.openai_schema import (
    MAX_TOP_LOGPROBS,
    FunctionDefinition,
    RequestModel,
    ResponseFormatJSONObject,
    ResponseFormatText,
    TokenCount,
)


class InputText(RequestModel):
    # output_text: an earlier assistant answer sent back as input
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None


class MessageItem(RequestModel):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionCallItem(RequestModel):
    """An earlier answer's function call, sent back with the conversation."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(RequestModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


class ReasoningItem(RequestModel):
    """An earlier answer's reasoning, sent back: accepted and left out of the prompt (as the
    chat endpoint does with ``reasoning_content``)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[Any] | None = None
    content: list[Any] | None = None
    encrypted_content: str | None = None
    status: str | None = None


# the union's tags are class names: pydantic puts the tag into an error's loc, and the
# gateway's error paths leave capitalized parts out (errors._is_union_tag)
_ITEM_TAGS = {
    "message": "MessageItem",
    "function_call": "FunctionCallItem",
    "function_call_output": "FunctionCallOutputItem",
    "reasoning": "ReasoningItem",
}


def _item_tag(item: Any) -> str | None:
    # an "easy" input message ({"role", "content"}, what the Agents SDK sends) has no type
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", None)
    return _ITEM_TAGS.get(kind) if isinstance(kind, str) else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("MessageItem")]
    | Annotated[FunctionCallItem, Tag("FunctionCallItem")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutputItem")]
    | Annotated[ReasoningItem, Tag("ReasoningItem")],
    Discriminator(_item_tag),
]


class FunctionTool(FunctionDefinition):
    """The Responses API's flat function tool (chat nests the same under ``function``)."""

    type: Literal["function"]


class NamedFunction(RequestModel):
    type: Literal["function"]
    name: str


class JSONSchemaTextFormat(RequestModel):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | JSONSchemaTextFormat,
    Field(discriminator="type"),
]


class TextConfig(RequestModel):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the only one a model without the knob has


class ResponsesRequest(RequestModel):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: TokenCount | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    # Stateless: nothing is stored, so nothing can be continued or included from storage.
    store: Literal[False] | None = None
    include: list[Literal["message.output_text.logprobs"]] | None = None
    truncation: Literal["disabled"] | None = None
    # accepted no-ops, as on chat
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default"] | None = None
