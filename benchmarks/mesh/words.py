"""The token ids a model-free stepping worker emits: ordinary word tokens of the model's own
vocabulary (" house", " river"...), so a detokenizer downstream does the work it does for a
real model's output, rather than decoding one repeated id or bytes that never form text."""

from __future__ import annotations

import re
from pathlib import Path

import tokenizers

# a whole word after a space: decodes to itself, never merges with its neighbours into a
# multi-byte character, and is never special
_WORD = re.compile(r"^ [A-Za-z]{3,}$")
# without tokenizer files (random weights) ids are taken from the upper part of the vocabulary,
# away from the special and byte tokens most vocabularies start with
_FALLBACK_START = 0.25


def word_token_ids(model_dir: Path | None, vocab_size: int, eos: frozenset[int]) -> list[int]:
    """Ordinary word ids of the tokenizer in ``model_dir`` (ascending), or, without one, a
    range of ids that are not EOS."""
    file = model_dir / "tokenizer.json" if model_dir is not None else None
    if file is not None and file.is_file():
        tok = tokenizers.Tokenizer.from_file(str(file))
        banned = set(tok.get_added_tokens_decoder()) | eos
        n = min(vocab_size, tok.get_vocab_size(with_added_tokens=True))
        pieces = tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        ids = [i for i, p in enumerate(pieces) if _WORD.match(p) and i not in banned]
        if ids:
            return ids
    start = int(vocab_size * _FALLBACK_START)
    return [i for i in range(start, vocab_size) if i not in eos]
