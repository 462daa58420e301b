"""The paged-KV inference engine.

``sequence`` (request state) → ``block_manager`` (pages, prefix cache) → ``scheduler``
(continuous batching, chunked prefill) → ``model_runner`` (tensors, model, KV cache) →
``sampler``; ``llm_engine`` composes them into ``step()``, ``async_engine`` serves them to asyncio.
"""

from pdmesh.engine.async_engine import AsyncEngine
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.kv_cache import KVLayout
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.outputs import EngineLoad, RequestOutput
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import FinishReason, TokenLogprob
from pdmesh.errors import (
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    RequestNotFoundError,
    ResourceExhaustedError,
)

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "EngineLoad",
    "FinishReason",
    "InvalidRequestError",
    "KVLayout",
    "LLMEngine",
    "RequestNotFoundError",
    "RequestOutput",
    "ResourceExhaustedError",
    "SamplingParams",
    "TokenLogprob",
]
