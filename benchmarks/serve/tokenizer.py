"""Token ids <-> text for building prompts and counting their tokens.

Only the ``tokenizers`` library is used (no transformers, no torch), so loading is quick. The
prompts' special tokens are left out on both sides: the server adds its own (BOS, the chat
template), and a random prompt must not contain an EOS or a chat marker by chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import tokenizers

REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 sequence gives


class TokenizerLike(Protocol):
    """What the datasets need from a tokenizer."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def sampleable_ids(self) -> npt.NDArray[np.int64]:
        """Ids a random prompt may draw from: the vocabulary minus special/added tokens and
        pieces of characters."""
        ...


class BenchTokenizer:
    """A ``tokenizers.Tokenizer`` with the three operations the datasets need."""

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        self._backend = backend
        special = set(backend.get_added_tokens_decoder())
        vocab = backend.get_vocab_size(with_added_tokens=True)
        # Byte-level vocabularies hold pieces of multi-byte characters; alone they decode to
        # U+FFFD, which re-encodes to other tokens. Leaving them out keeps random text valid
        # and lets a text prompt be fitted to its drawn length (see datasets._as_prompt).
        pieces = backend.decode_batch([[i] for i in range(vocab)], skip_special_tokens=False)
        self._sampleable = np.array(
            [i for i, p in enumerate(pieces) if i not in special and REPLACEMENT not in p],
            dtype=np.int64,
        )
        if self._sampleable.size == 0:
            raise ValueError("the tokenizer has no ordinary (non-special) tokens to sample from")

    @classmethod
    def from_path(cls, path: str | Path) -> BenchTokenizer:
        """Load a Hugging Face model dir holding ``tokenizer.json``, or that file itself."""
        p = Path(path).expanduser()
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {p}")
        return cls(tokenizers.Tokenizer.from_file(str(file)))

    def encode(self, text: str) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._backend.decode(list(ids), skip_special_tokens=False))

    def sampleable_ids(self) -> npt.NDArray[np.int64]:
        return self._sampleable


def load_tokenizer(spec: str) -> BenchTokenizer:
    """``--tokenizer``: a path, or empty for the default model (fetched on first use)."""
    if spec:
        return BenchTokenizer.from_path(spec)
    # Imported here: only the default needs it, and it may convert the model on first use.
    from pdmesh.models.fetch import ensure_default_model

    return BenchTokenizer.from_path(ensure_default_model())
