"""Turn one step's logits into tokens: penalties, temperature, top-k/top-p/min-p, seeds, logprobs.

NOTE: rows are independent of their batch neighbours. A seeded row draws from a generator
seeded by ``(seed, position)``, so the same seed gives the same tokens whatever else is batched,
after a preemption, or when a request moves between engines (PD). Reported logprobs are those of
the model's distribution after penalties, before temperature and truncation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import TokenLogprob


@dataclass
class SampleRow:
    """What the sampler needs from one sequence (built by the model runner)."""

    params: SamplingParams
    # prompt + output so far: the sequence's own list, not a copy (a copy per row per step
    # costs O(context) interpreter time, ~ms at batch 64 with 4k contexts)
    token_ids: list[int]
    num_prompt_tokens: int
    # tokens that may not be sampled now: EOS and stop ids until min_new_tokens is reached
    banned_ids: tuple[int, ...] = ()

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._gen = torch.Generator(device=device).manual_seed(seed)
        self._seeded = torch.Generator(device=device)

    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, rows: list[SampleRow]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        # logits: [B, vocab] float32
        if any(r.params.has_penalties or r.banned_ids for r in rows):
            logits = logits.clone()
            for i, r in enumerate(rows):
                if r.params.has_penalties:
                    _apply_penalties(logits[i], r)
                if r.banned_ids:
                    logits[i, list(r.banned_ids)] = float("-inf")
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        rand = [i for i, r in enumerate(rows) if not r.params.greedy]
        if greedy:
            idx = torch.tensor(greedy, device=logits.device)
            tokens[idx] = logits[idx].argmax(dim=-1)
        if rand:
            idx = torch.tensor(rand, device=logits.device)
            tokens[idx] = self._sample(logits[idx], [rows[i] for i in rand])
        token_list = tokens.tolist()
        return token_list, _logprobs(logits, rows, token_list)

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        dev = logits.device
        temp = torch.tensor([r.params.temperature for r in rows], device=dev)
        logits = logits / temp.unsqueeze(1)
        if any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in rows):
            logits = _top_k_top_p(logits, rows)
        probs = logits.softmax(dim=-1)
        if any(r.params.min_p > 0 for r in rows):
            min_p = torch.tensor([r.params.min_p for r in rows], device=dev)
            cutoff = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
            probs = probs.masked_fill(probs < cutoff, 0.0)
        # exponential race: argmax(p / E) with E ~ Exp(1) draws from p, one generator per row
        noise = torch.empty_like(probs)
        for i, r in enumerate(rows):
            if r.params.seed is None:
                noise[i].exponential_(generator=self._gen)
            else:
                pos = len(r.token_ids)
                self._seeded.manual_seed(hash((r.params.seed, pos)) & (2**63 - 1))
                noise[i].exponential_(generator=self._seeded)
        return (probs / noise).argmax(dim=-1)


def _apply_penalties(logits: torch.Tensor, r: SampleRow) -> None:
    p = r.params
    dev = logits.device
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), device=dev)
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
    if r.output_ids and (p.frequency_penalty or p.presence_penalty):
        counts = torch.bincount(
            torch.tensor(r.output_ids, device=dev), minlength=logits.shape[0]
        ).to(logits.dtype)
        logits -= counts * p.frequency_penalty + (counts > 0).to(logits.dtype) * p.presence_penalty


def _top_k_top_p(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    dev = logits.device
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    top_k = torch.tensor(
        [r.params.top_k if r.params.top_k > 0 else vocab for r in rows], device=dev
    )
    ranks = torch.arange(vocab, device=dev).unsqueeze(0)
    drop = ranks >= top_k.unsqueeze(1)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # rows without top-p get a bound above 1 so float rounding in cumsum never drops their tail
    top_p = torch.tensor([r.params.top_p if r.params.top_p < 1 else 2.0 for r in rows], device=dev)
    # drop a token when the mass before it already reaches top_p (the first token always stays)
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _logprobs(
    logits: torch.Tensor, rows: list[SampleRow], tokens: list[int]
) -> list[TokenLogprob | None]:
    want = [i for i, r in enumerate(rows) if r.params.logprobs or r.params.top_logprobs]
    out: list[TokenLogprob | None] = [None] * len(rows)
    if not want:
        return out
    lp = logits[want].log_softmax(dim=-1)
    n = max(rows[i].params.top_logprobs for i in want)
    top_v, top_i = lp.topk(n, dim=-1) if n else (lp[:, :0], lp[:, :0].long())
    dev = logits.device
    picked = torch.tensor([tokens[i] for i in want], device=dev)
    chosen = lp[torch.arange(len(want), device=dev), picked].tolist()
    top_v_l, top_i_l = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(want):
        k = rows[i].params.top_logprobs
        top = tuple(zip(top_i_l[j][:k], top_v_l[j][:k]))
        out[i] = TokenLogprob(tokens[i], chosen[j], top)
    return out
