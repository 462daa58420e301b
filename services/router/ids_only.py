"""``TokenIdsOnly``: what the router uses instead of a detokenizer when a request asks for
token ids only (``sampling_params.detokenize = false``).

Such a client turns ids into text itself (or measures the routing hop alone), so the router
makes no tokenizer call at all for a token-id prompt: no text, and therefore no stop strings.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdmesh.errors import InvalidRequestError
from pdmesh.tokenizer import StreamDelta
from pdmesh.v1 import common_pb2


def wants_ids_only(params: common_pb2.SamplingParams) -> bool:
    return params.HasField("detokenize") and not params.detokenize


class TokenIdsOnly:
    """Answers ``push`` like a ``tokenizer_client.Detokenizer`` that never releases text nor
    matches a stop (synchronous too: nothing to wait for)."""

    def __init__(self, params: common_pb2.SamplingParams) -> None:
        if params.stop:
            raise InvalidRequestError(
                "sampling_params.stop", "stop strings need text: not with detokenize=false"
            )
        self._num_tokens = 0

    def push(self, token_ids: Sequence[int], final: bool) -> StreamDelta:
        self._num_tokens += len(token_ids)
        return StreamDelta("", num_tokens=self._num_tokens)

    def close(self) -> None:
        return None
