"""Request bodies of the OpenAI-compatible endpoints, as pydantic models.

Bounds live on the fields, so FastAPI rejects a bad value with a 400 naming it before any
handler runs. Every model is a ``RequestModel``: a field it does not declare is a 400 naming it
(OpenAI's own "Unrecognized request argument"), never silently ignored, and an explicit JSON
``null`` means the same as leaving the field out (OpenAI's types allow ``null`` for every
optional parameter; clients built on them send it). The few OpenAI fields that change nothing
a mesh without storage or billing could do (``user``, ``metadata``, ...) are declared and
documented as accepted no-ops. Beyond OpenAI's own fields, the SGLang/vLLM extras ``top_k``,
``min_p``, ``repetition_penalty``, ``ignore_eos``, ``min_tokens``, ``stop_token_ids`` and
``skip_special_tokens`` pass through to the sampler.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 64  # each choice is a router call: keep one request from flooding the mesh
# choices of one request over all its prompts (a batch of prompts times n): the router's
# default --max-concurrent-requests, so one request cannot take more than the mesh runs at once
MAX_CHOICES = 256
# token counts and ids are int32 on the wire: a larger value is the client's error (400), not
# a failure to build the message (500). Beyond the context length a count changes nothing.
MAX_INT32 = 2**31 - 1
# the range the wire carries; the tokenizer and workers check ids against the vocabulary
TokenId = Annotated[int, Field(ge=-(2**31), le=MAX_INT32)]
TokenCount = Annotated[int, Field(ge=0, le=MAX_INT32)]
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**64 - 1


MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on each bias


class RequestModel(BaseModel):
    """Undeclared fields are refused; ``null`` is "not given" (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        # dropped before validation, so each field's own default applies: "n": null → n = 1
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(RequestModel):
    include_usage: bool = False
    # OpenAI's padding of chunks against side channels; nothing to hide on the mesh's own link
    include_obfuscation: bool = False


class SamplingFields(RequestModel):
    """What chat and completions requests share: the model, ``n``, streaming and sampling."""

    model: str
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    # SGLang / vLLM extras
    top_k: int | None = Field(default=None, ge=-1, le=MAX_INT32)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool | None = None
    min_tokens: TokenCount | None = None
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool | None = None
    # token id (as a JSON object key) → bias added to its logit, in [-100, 100]
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = (
        None
    )
    # Accepted no-ops: an end-user id for abuse tracking, a caching hint (the mesh's prefix
    # cache needs none), tags for stored completions. The mesh stores nothing and has one tier:
    # store and service_tier are accepted only where they ask for nothing else.
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    store: Literal[False] | None = None
    service_tier: Literal["auto", "default"] | None = None

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class FunctionCall(RequestModel):
    name: str
    arguments: str  # JSON text, as the model produced it


class ToolCall(RequestModel):
    """A tool call of an earlier assistant message, as OpenAI returned it."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # a list of parts is OpenAI's multi-part form; only text parts are understood here
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # an earlier answer's reasoning, as clients echo it back: accepted and left out of the
    # prompt (the reasoning models' own templates drop past turns' thinking too)
    reasoning_content: str | None = None
    # an earlier answer's refusal text (OpenAI's field); pdmesh never refuses, so none to render
    refusal: str | None = None

    @property
    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content


class FunctionDefinition(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    # a JSON schema of the arguments object; absent: a function without parameters
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments always follow the schema where it is enforced


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: ToolChoiceFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JSONSchemaFormat(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    # OpenAI's field is called "schema"; pydantic reserves that name on models
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the mesh always enforces the schema (constrained decoding)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormatText(RequestModel):
    type: Literal["text"]


class ResponseFormatJSONObject(RequestModel):
    type: Literal["json_object"]


class ResponseFormatJSONSchema(RequestModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
    Field(discriminator="type"),
]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI's newer name for max_tokens on chat; it wins when both are given
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's extras: the assistant header at the end (default true), or the last message left
    # open for the model to continue (a prefilled answer; implies add_generation_prompt false)
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    # SGLang's extra: false keeps a reasoning model's thinking inside ``content``
    separate_reasoning: bool | None = None
    # text output only ("audio" is not served)
    modalities: list[Literal["text"]] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


Prompt = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    # the number of most likely tokens to return at each position (0 = only the sampled one)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    # server-side best-of-n is not served: only the value that asks for nothing extra
    best_of: Literal[1] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens
