"""The prompts a run sends: random lengths, a shared-prefix multi-tenant workload, or ShareGPT.

Every dataset is a list of ``BenchRequest`` in send order, built from ``--seed`` alone, so two
runs with the same flags send the same prompts in the same order.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.tokenizer import REPLACEMENT, TokenizerLike

log = logging.getLogger(__name__)

Prompt = str | list[int]

# Between a shared prefix and its question in text prompts: whitespace makes every pre-tokenizer
# split there, so the prefix's tokens stay the same whatever question follows (else the last
# prefix token could merge with the question's first and miss the prefix cache).
PREFIX_SEPARATOR = "\n\n"

FIT_ROUNDS = 8  # re-encode rounds to bring a text prompt to its drawn length (1-2 suffice)

HUMAN_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing", "model"})


@dataclass(frozen=True)
class BenchRequest:
    """One request of the run."""

    index: int  # position in send order; also the request id's suffix
    prompt: Prompt  # the user part: text, or token ids with --input-format token-ids
    prompt_len: int  # tokens of the whole prompt (prefix included), by the bench tokenizer
    output_len: int  # max tokens to ask for (exact with --ignore-eos)
    prefix: Prompt | None = None  # shared-prefix: the group's system prompt
    group: int | None = None  # shared-prefix: which system prompt

    def full_prompt(self) -> Prompt:
        """The prompt as one piece: prefix then question (completions and gRPC backends)."""
        if self.prefix is None:
            return self.prompt
        if isinstance(self.prefix, str) and isinstance(self.prompt, str):
            return self.prefix + PREFIX_SEPARATOR + self.prompt
        if isinstance(self.prefix, list) and isinstance(self.prompt, list):
            return self.prefix + self.prompt
        raise TypeError("prefix and prompt must both be text or both token ids")

    def messages(self) -> list[dict[str, str]]:
        """The prompt as chat messages: the prefix as the system message (chat backend)."""
        if not isinstance(self.prompt, str) or not isinstance(self.prefix, str | None):
            raise TypeError("chat messages need text prompts")
        msgs = [] if self.prefix is None else [{"role": "system", "content": self.prefix}]
        return [*msgs, {"role": "user", "content": self.prompt}]


def build_dataset(cfg: ServeBenchConfig, tokenizer: TokenizerLike) -> list[BenchRequest]:
    """The requests ``cfg`` describes, in send order."""
    rng = np.random.default_rng(cfg.seed)
    as_ids = cfg.input_format == "token-ids"
    if cfg.dataset == "random":
        return random_requests(
            tokenizer,
            rng,
            cfg.num_prompts,
            cfg.random_input_len,
            cfg.random_output_len,
            cfg.random_range_ratio,
            as_ids,
        )
    if cfg.dataset == "shared-prefix":
        return shared_prefix_requests(
            tokenizer,
            rng,
            cfg.num_groups,
            cfg.prompts_per_group,
            cfg.system_prompt_len,
            cfg.question_len,
            cfg.shared_prefix_output_len,
            as_ids,
        )
    return sharegpt_requests(
        Path(cfg.dataset_path),
        tokenizer,
        rng,
        cfg.num_prompts,
        as_ids,
        fixed_output_len=cfg.sharegpt_output_len,
        max_prompt_len=cfg.sharegpt_max_prompt_len,
        max_total_len=cfg.sharegpt_max_total_len,
    )


# ----------------------------------------------------------------------------------- random


def sample_lengths(rng: np.random.Generator, n: int, length: int, range_ratio: float) -> list[int]:
    """``n`` lengths drawn uniformly from the integers in [length*(1-range_ratio), length]."""
    low = max(1, round(length * (1.0 - range_ratio)))
    return [int(x) for x in rng.integers(low, length + 1, size=n)]


def random_ids(tokenizer: TokenizerLike, rng: np.random.Generator, n: int) -> list[int]:
    return [int(x) for x in rng.choice(tokenizer.sampleable_ids(), size=n)]


def _as_prompt(
    tokenizer: TokenizerLike, rng: np.random.Generator, ids: list[int], as_ids: bool
) -> tuple[Prompt, int]:
    """``ids`` as the prompt to send, and its length in tokens.

    Decoded random ids rarely re-encode to the same count (neighbouring pieces merge or
    split: ~5% more tokens with SmolLM2's BPE), so a text prompt is re-encoded and trimmed or
    topped up until it holds the drawn count; that takes one or two rounds. Its length is
    measured on the text the server will actually see.
    """
    if as_ids:
        return ids, len(ids)
    want = len(ids)
    text = tokenizer.decode(ids)
    for _ in range(FIT_ROUNDS):
        got = tokenizer.encode(text)
        if len(got) == want:
            return text, want
        if len(got) > want:
            # a cut inside a multi-byte character decodes to U+FFFD: drop that half character
            text = tokenizer.decode(got[:want]).rstrip(REPLACEMENT)
        else:
            text = tokenizer.decode(got + random_ids(tokenizer, rng, want - len(got)))
    return text, len(tokenizer.encode(text))  # not fitted: at least the count is true


def random_requests(
    tokenizer: TokenizerLike,
    rng: np.random.Generator,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    as_ids: bool,
) -> list[BenchRequest]:
    """Prompts of random token ids with lengths drawn per ``sample_lengths``."""
    in_lens = sample_lengths(rng, num_prompts, input_len, range_ratio)
    out_lens = sample_lengths(rng, num_prompts, output_len, range_ratio)
    out = []
    for i, (n_in, n_out) in enumerate(zip(in_lens, out_lens)):
        prompt, n = _as_prompt(tokenizer, rng, random_ids(tokenizer, rng, n_in), as_ids)
        out.append(BenchRequest(index=i, prompt=prompt, prompt_len=n, output_len=n_out))
    return out


# ------------------------------------------------------------------------------ shared-prefix


def shared_prefix_requests(
    tokenizer: TokenizerLike,
    rng: np.random.Generator,
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
    as_ids: bool,
) -> list[BenchRequest]:
    """``num_groups`` random system prompts, each followed by ``prompts_per_group`` questions.

    The requests are shuffled, as tenants' users would interleave, so a prefix cache has to
    keep several prefixes alive at once rather than one at a time.
    """
    drafts: list[tuple[int, Prompt, Prompt]] = []
    for g in range(num_groups):
        system, _ = _as_prompt(
            tokenizer, rng, random_ids(tokenizer, rng, system_prompt_len), as_ids
        )
        for _ in range(prompts_per_group):
            question, _ = _as_prompt(
                tokenizer, rng, random_ids(tokenizer, rng, question_len), as_ids
            )
            drafts.append((g, system, question))
    out = []
    for i, k in enumerate(rng.permutation(len(drafts))):
        g, system, question = drafts[int(k)]
        req = BenchRequest(i, question, 0, output_len, prefix=system, group=g)
        out.append(replace(req, prompt_len=_count(tokenizer, req.full_prompt())))
    return out


def _count(tokenizer: TokenizerLike, prompt: Prompt) -> int:
    return len(prompt) if isinstance(prompt, list) else len(tokenizer.encode(prompt))


# ---------------------------------------------------------------------------------- sharegpt


def first_exchange(entry: Any) -> tuple[str, str] | None:
    """(first human turn, the assistant turn after it) of a ShareGPT entry, or None."""
    if not isinstance(entry, dict):
        return None
    turns = entry.get("conversations", entry.get("conversation"))
    if not isinstance(turns, list):
        return None
    prompt: str | None = None
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            continue
        role = str(turn.get("from", "")).lower()
        if prompt is None and role in HUMAN_ROLES:
            prompt = turn["value"]
        elif prompt is not None and role in ASSISTANT_ROLES:
            return prompt, turn["value"]
    return None


def sharegpt_requests(
    path: Path,
    tokenizer: TokenizerLike,
    rng: np.random.Generator,
    num_prompts: int,
    as_ids: bool,
    fixed_output_len: int = 0,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
) -> list[BenchRequest]:
    """``num_prompts`` first exchanges of a ShareGPT file, in a seeded random order.

    Like SGLang: exchanges whose prompt or answer has fewer than 2 tokens are skipped (too
    short to time), and so are those over ``max_prompt_len`` / ``max_total_len`` (0 = no
    limit). Conversations are tokenized lazily, so a large file costs only what is used.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the ShareGPT file {path}: {e}") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{conversations: [...]}} entries")
    exchanges = [x for x in (first_exchange(e) for e in data) if x is not None]
    if not exchanges:
        raise ValueError(f"{path}: no entry has a human turn followed by a gpt turn")
    out: list[BenchRequest] = []
    for k in rng.permutation(len(exchanges)):
        if len(out) == num_prompts:
            break
        prompt_text, answer = exchanges[int(k)]
        prompt_ids = tokenizer.encode(prompt_text)
        n_out = fixed_output_len or len(tokenizer.encode(answer))
        if len(prompt_ids) < 2 or n_out < 2:
            continue
        if max_prompt_len and len(prompt_ids) > max_prompt_len:
            continue
        if max_total_len and len(prompt_ids) + n_out > max_total_len:
            continue
        prompt: Prompt = prompt_ids if as_ids else prompt_text
        out.append(BenchRequest(len(out), prompt, len(prompt_ids), n_out))
    if not out:
        raise ValueError(f"{path}: no conversation passed the length filters")
    if len(out) < num_prompts:
        log.warning("%s has only %d usable conversations; sending those", path, len(out))
    return out
