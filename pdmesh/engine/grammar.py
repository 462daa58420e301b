"""Constrained decoding on llguidance: compiled grammars, per-sequence matchers, token masks.

- ``GrammarCompiler`` turns a request's ``json_schema`` / ``regex`` / ``ebnf`` into a
  ``CompiledGrammar`` (llguidance's grammar, checked against the model's tokenizer), cached in a
  bounded LRU keyed by (kind, text); failures are cached too, so a client repeating a bad
  schema costs one compile. Thread-safe: ``AsyncEngine`` compiles on its own pool, the engine
  thread then finds the grammar in the cache (see ``AsyncEngine.prepare``).
- a constrained ``Sequence`` holds one ``LLMatcher`` (a copy of the compiled grammar's
  template, ~1 us), advanced with every token the sequence gets.
- ``MaskFiller`` fills one step's bitmask (1 bit per vocabulary id) for the constrained rows
  in one call into llguidance's Rust thread pool (``fill_next_token_bitmask_par``), into a
  pinned host buffer; ``apply_bitmask`` turns it into -inf on the disallowed logits with a few
  tensor ops, on CPU or CUDA alike (no Python loop over the vocabulary).

NOTE on the tokenizer: llguidance's ``LLTokenizer`` is built from the model directory's
``tokenizer.json`` (what ``llguidance.hf.from_tokenizer`` serializes from a transformers
tokenizer, without making transformers a worker dependency), with the model's vocabulary size
(the logits' width, which may exceed the tokenizer's: ids past it are never allowed) and its
EOS ids. It takes ~0.7 s, so it is built once, on first use.

NOTE on slices: llguidance computes a mask faster where it can take whole precomputed token
sets ("slices", e.g. every token that fits inside a JSON string) instead of walking the token
trie. The slices are a property of the tokenizer object, and only change speed, never which
tokens are allowed. JSON grammars get ``json_slices()``: 64 rows of the bench's schema without
``maxLength`` fill in 0.76 ms instead of 2.40 ms with the general slices (2 CPU cores); regex
and ebnf keep the general ones. A bounded string (``maxLength``, ``{0,40}`` in a regex) defeats
both: the same 64 rows take ~13 ms either way, so such schemas cost real CPU per token.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import llguidance
import torch
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

from pdmesh.errors import InvalidRequestError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# SamplingParams fields that carry a grammar, and llguidance's format for each (SGLang's names;
# "ebnf" is llama.cpp's GBNF or a Lark grammar, llguidance converts GBNF to Lark)
GRAMMAR_KINDS = {"json_schema": "json_schema", "regex": "regex", "ebnf": "gbnf"}

# JSON laid out as json.dumps does (`{"a": 1, "b": [2, 3]}`), not llguidance's default of any
# whitespace anywhere: with that, small models wander into runs of spaces and newlines between
# tokens (SmolLM2-135M, greedy: `{\n  "name"  \n  : "Alex"\n \n\n,...`), which costs tokens
# and never helps a parser. A schema's "x-guidance" object overrides it (e.g.
# {"whitespace_flexible": true}).
JSON_LAYOUT: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}

# error messages without the parser state and grammar dump (the default): they reach clients
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)
_MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class CompiledGrammar:
    kind: str  # a GRAMMAR_KINDS key
    # a matcher that never consumes anything: each sequence gets a deep copy of it
    template: llguidance.LLMatcher

    def matcher(self) -> llguidance.LLMatcher:
        return self.template.deep_copy()


@dataclass(frozen=True)
class _Failure:
    message: str


class GrammarCompiler:
    def __init__(
        self,
        tokenizer_dir: Path | None,
        vocab_size: int,
        eos_token_ids: list[int],
        cache_size: int = 256,
    ) -> None:
        """``tokenizer_dir``: where ``tokenizer.json`` is (None: a model without one, e.g.
        random weights, refuses constrained requests)."""
        self._dir = tokenizer_dir
        self._vocab_size = vocab_size
        self._eos = eos_token_ids
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar | _Failure] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._json_tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_lock = threading.Lock()

    def compile(self, kind: str, text: str) -> CompiledGrammar:
        """The grammar of ``sampling_params.<kind>`` = ``text``; raises
        ``InvalidRequestError`` naming that field when it cannot compile."""
        key = (kind, text)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is None:
            tokenizer = self.tokenizer(json=kind == "json_schema")
            if tokenizer is None:
                raise InvalidRequestError(
                    f"sampling_params.{kind}",
                    "constrained decoding needs the model's tokenizer.json, and this model has "
                    "none (random weights?)",
                )
            # outside the lock: a slow grammar must not hold up other requests' cache hits
            # (two threads compiling the same text at once both succeed; one entry stays)
            hit = _compile(tokenizer, kind, text)
            with self._lock:
                self._cache[key] = hit
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if isinstance(hit, _Failure):
            raise InvalidRequestError(f"sampling_params.{kind}", hit.message)
        return hit

    def cached(self, kind: str, text: str) -> bool:
        with self._lock:
            return (kind, text) in self._cache

    def tokenizer(self, json: bool = False) -> llguidance.LLTokenizer | None:
        """llguidance's view of the model's tokenizer, with the JSON slices when ``json``
        (module NOTE); None when the model has none."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                path = self._dir / "tokenizer.json" if self._dir is not None else None
                if path is None or not path.is_file():
                    return None
                self._tokenizer = llguidance.LLTokenizer(
                    path.read_text(), n_vocab=self._vocab_size, eos_token=list(self._eos)
                )
            if not json:
                return self._tokenizer
            if self._json_tokenizer is None:
                slices = llguidance.LLTokenizer.json_slices()
                self._json_tokenizer = self._tokenizer.with_slices(slices)
            return self._json_tokenizer


def _compile(tokenizer: llguidance.LLTokenizer, kind: str, text: str) -> CompiledGrammar | _Failure:
    if kind not in GRAMMAR_KINDS:
        raise ValueError(f"unknown grammar kind {kind!r}")
    try:
        if kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_LAYOUT)
        else:
            grammar = llguidance.grammar_from(GRAMMAR_KINDS[kind], text)  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:  # not JSON, GBNF that does not parse, ...
        return _Failure(_short(str(e)))
    # the matcher compiles the grammar (lexer, parser) against the tokenizer; it never
    # raises for a bad grammar, it is in an error state
    template = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=_LIMITS)
    if template.is_error():
        return _Failure(_short(template.get_error()))
    return CompiledGrammar(kind, template)


def _short(message: str) -> str:
    message = message.strip() or "does not compile"
    return message if len(message) <= _MAX_ERROR_CHARS else message[:_MAX_ERROR_CHARS] + "..."


class MaskFiller:
    """One step's bitmask of the constrained rows, on the host (pinned where CUDA is)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._executor: llguidance.LLExecutor | None = None
        self._buffer = allocate_token_bitmask(0, vocab_size)

    def fill(self, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """[len(matchers), ceil(vocab / 32)] int32: bit ``t % 32`` of word ``t // 32`` of row
        ``i`` is set when token ``t`` is allowed after what ``matchers[i]`` consumed."""
        n = len(matchers)
        if self._buffer.shape[0] < n:
            self._buffer = allocate_token_bitmask(
                max(n, 2 * self._buffer.shape[0]), self.vocab_size
            )
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        out = self._buffer[:n]
        # NOTE: a buffer reused across steps: the previous upload of it has finished, since
        # masks are filled only once the step before has resolved (llm_engine.py NOTE: its
        # tokens' copy is queued after the sampling that read the upload)
        fill_next_token_bitmask_par(self._executor, list(zip(matchers, range(n))), out)
        return out


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set ``logits[rows[i], t]`` to -inf for every token ``t`` that ``bitmask[i]`` disallows
    (in place; ``bitmask`` on the logits' device)."""
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [k, words, 32], token = 32 * word + bit
    allowed = bits.view(bitmask.shape[0], -1)[:, : logits.shape[1]].bool()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
