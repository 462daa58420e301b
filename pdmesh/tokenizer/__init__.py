"""Tokenization for the tokenizer service: ``tokenizer`` (encode/decode, special tokens),
``chat`` (conversations and HF-compatible chat templates), ``detokenizer`` (incremental,
UTF-8-safe decoding) and ``stop_strings`` (stop-string matching over streamed text).

Pure Python over the ``tokenizers`` library: no transformers, no gRPC.
"""

from pdmesh.tokenizer.chat import ChatMessage, ChatRequest, ChatTemplate
from pdmesh.tokenizer.detokenizer import IncrementalDetokenizer, StreamDelta, StreamDetokenizer
from pdmesh.tokenizer.stop_strings import StopMatch, StopStringMatcher
from pdmesh.tokenizer.tokenizer import Tokenizer, TokenizerInfo

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "ChatTemplate",
    "IncrementalDetokenizer",
    "StopMatch",
    "StopStringMatcher",
    "StreamDelta",
    "StreamDetokenizer",
    "Tokenizer",
    "TokenizerInfo",
]
