"""Request bodies of the OpenAI-compatible endpoints, as pydantic models.

Bounds live on the fields, so FastAPI rejects a bad value with a 400 naming it before any
handler runs. Fields the gateway does not use (``user``, ``metadata``, ...) are accepted and
ignored, as OpenAI clients send them freely. Beyond OpenAI's own fields, the SGLang/vLLM extras
``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``min_tokens``,
``stop_token_ids`` and ``skip_special_tokens`` pass through to the sampler.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What chat and completions requests share: the model, ``n``, streaming and sampling."""

    model_config = ConfigDict(extra="ignore")

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

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # a list of parts is OpenAI's multi-part form; only text parts are understood here
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @property
    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI's newer name for max_tokens on chat; it wins when both are given
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

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

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens
