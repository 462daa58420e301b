"""Request body of SGLang's native ``POST /generate``, as pydantic models.

Same field names and meanings as SGLang's ``GenerateReqInput`` / ``SamplingParams``, for the
subset the mesh serves: a text or token-id prompt (one, or a batch as a list), sampling params,
streaming and logprobs, constrained decoding (``json_schema``, ``regex``, ``ebnf``) and
``logit_bias``. A field of SGLang's that the mesh does not serve is a 400 naming it, not
silently ignored; ``null`` means not given.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from services.gateway.openai_schema import (
    MAX_INT32,
    MAX_LOGIT_BIAS,
    MAX_N,
    MAX_SEED,
    MAX_TOP_LOGPROBS,
    RequestModel,
    TokenCount,
    TokenId,
)


class NativeSamplingParams(RequestModel):
    max_new_tokens: TokenCount | None = None
    min_new_tokens: TokenCount | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_INT32)
    min_p: float | None = Field(default=None, ge=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    # SGLang's name for the per-request seed
    sampling_seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    # pdmesh's (vLLM's name): false = output_ids only, "text" stays empty, no tokenizer call
    detokenize: bool | None = None
    # constrained decoding, at most one: a JSON schema (as JSON text), a regular expression,
    # or an EBNF grammar (SGLang's names)
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    # token id (as a JSON object key) → bias added to its logit, in [-100, 100]
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = (
        None
    )


class GenerateRequest(RequestModel):
    text: str | list[str] | None = None
    input_ids: list[TokenId] | list[list[TokenId]] | None = None
    sampling_params: NativeSamplingParams = NativeSamplingParams()
    stream: bool = False
    rid: str | None = None
    return_logprob: bool = False
    top_logprobs_num: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
