"""Request body of SGLang's native ``POST /generate``, as pydantic models.

Same field names and meanings as SGLang's ``GenerateReqInput`` / ``SamplingParams``, for the
subset the mesh serves: a text or token-id prompt (one, or a batch as a list), sampling params,
streaming and logprobs. Unknown fields are ignored, as SGLang's own clients send more.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from services.gateway.openai_schema import (
    MAX_INT32,
    MAX_N,
    MAX_SEED,
    MAX_TOP_LOGPROBS,
    TokenCount,
    TokenId,
)


class NativeSamplingParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

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


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str | list[str] | None = None
    input_ids: list[TokenId] | list[list[TokenId]] | None = None
    sampling_params: NativeSamplingParams = NativeSamplingParams()
    stream: bool = False
    rid: str | None = None
    return_logprob: bool = False
    top_logprobs_num: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
