"""Request bodies of ``POST /tokenize`` and ``POST /detokenize``: one model each that takes both
vLLM's and SGLang's shapes (the union of their fields, the same meaning where they share one).

``/tokenize``:

- vLLM, text: ``{"model"?, "prompt": str, "add_special_tokens"?: true, "return_token_strs"?}``;
- vLLM, chat: ``{"model"?, "messages", "add_generation_prompt"?: true, "add_special_tokens"?:
  false, "tools"?, "chat_template_kwargs"?, "continue_final_message"?: false,
  "return_token_strs"?}``;
- SGLang: ``{"model"?, "prompt": str | [str, ...], "add_special_tokens"?: true}`` (a list is
  a batch: each answer field is then a list, one entry per prompt).

``/detokenize``: ``{"model"?, "tokens": [int, ...] | [[int, ...], ...], "skip_special_tokens"?}``
(vLLM's ``tokens``; a list of lists is SGLang's batch; ``skip_special_tokens`` is SGLang's).

As everywhere in the gateway (``RequestModel``): an undeclared field is a 400 naming it, an
explicit ``null`` means not given. Which of ``prompt`` / ``messages`` is given, and the fields
that only go with one of them, are checked in ``services.gateway.tokenization``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from services.gateway.openai_schema import ChatMessage, RequestModel, TokenId, Tool


class TokenizeRequest(RequestModel):
    # checked against the served model when given (both servers have a default)
    model: str | None = None
    # text: one, or (SGLang) a batch
    prompt: str | list[str] | None = None
    # or a chat, rendered with the model's chat template as /v1/chat/completions renders it
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    # unset: true for a prompt, false for messages (the template placed them): vLLM's defaults
    add_special_tokens: bool | None = None
    # messages only
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's: also answer each token's vocabulary string (``token_strs``)
    return_token_strs: bool | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[TokenId] | list[list[TokenId]]
    # unset: false (special tokens kept, vLLM's: /detokenize inverts /tokenize exactly)
    skip_special_tokens: bool | None = None
