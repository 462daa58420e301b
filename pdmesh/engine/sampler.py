"""Turn one step's logits into tokens: penalties, logit_bias, grammar masks, temperature,
top-k/top-p/min-p, seeds, logprobs.

NOTE: rows are independent of their batch neighbours. A seeded row draws from a generator
seeded by ``(seed, position)``, so the same seed gives the same tokens whatever else is batched,
after a preemption, or when a request moves between engines (PD). Reported logprobs are those of
the model's distribution after penalties, logit_bias and bans (EOS below min_new_tokens, a
grammar's mask), before temperature and truncation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdmesh.engine.cuda_graphs import TransferFence, to_device, to_host
from pdmesh.engine.grammar import apply_bitmask
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
    # the row's length when its step launched: a deferred sample (model_runner.py) runs after
    # the engine has appended this step's placeholder to ``token_ids``, which is not context
    num_tokens: int = -1

    def __post_init__(self) -> None:
        if self.num_tokens < 0:
            self.num_tokens = len(self.token_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens : self.num_tokens]


@dataclass
class RowMasks:
    """Grammar masks of some of a step's sampled rows (grammar.py: 1 bit per token id)."""

    rows: list[int]  # indices into the sampled rows
    bits: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32, on the host


@dataclass
class Sampled:
    """One step's sampled tokens, still on the device, and what the host will read of them.

    ``tokens`` is what the next step's input ids are gathered from (overlap schedule: no sync
    needed to launch it). ``start_copy`` queues non-blocking copies into pinned host memory
    behind the sampling kernels and records an event; ``resolve`` waits for that event only, so
    it does not wait for work queued after it (the next step's forward). A blocking ``tolist()``
    would: it synchronizes the whole stream.
    """

    tokens: torch.Tensor  # [k] int64, one per sampled row
    # rows that asked for logprobs, their top_logprobs, and the tensors for them
    logprob_rows: list[int] = field(default_factory=list)
    top_counts: list[int] = field(default_factory=list)
    chosen: torch.Tensor | None = None  # [len(logprob_rows)] logprob of the sampled token
    top_values: torch.Tensor | None = None  # [len(logprob_rows), max top_logprobs]
    top_ids: torch.Tensor | None = None
    _host: list[torch.Tensor] = field(default_factory=list)
    _ready: TransferFence | None = None

    def start_copy(self) -> None:
        parts = [self.tokens]
        if self.chosen is not None:
            assert self.top_values is not None and self.top_ids is not None
            parts += [self.chosen, self.top_values, self.top_ids]
        self._host, self._ready = to_host(parts)

    def resolve(self) -> tuple[list[int], list[TokenLogprob | None]]:
        if self._ready is None:
            self.start_copy()
        assert self._ready is not None
        self._ready.wait()
        tokens: list[int] = self._host[0].tolist()
        out: list[TokenLogprob | None] = [None] * len(tokens)
        if self.logprob_rows:
            chosen, top_v, top_i = (t.tolist() for t in self._host[1:4])
            for j, i in enumerate(self.logprob_rows):
                k = self.top_counts[j]
                top = tuple(zip(top_i[j][:k], top_v[j][:k]))
                out[i] = TokenLogprob(tokens[i], chosen[j], top)
        return tokens, out


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._gen = torch.Generator(device=device).manual_seed(seed)
        self._seeded = torch.Generator(device=device)

    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, rows: list[SampleRow]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Sample and wait for the tokens on the host (``sample`` without the overlap)."""
        return self.sample(logits, rows).resolve()

    @torch.inference_mode()
    def greedy(self, logits: torch.Tensor) -> Sampled:
        """Every row greedy with nothing else to do: one argmax, no host data at all.

        The same tokens as ``sample`` gives such rows: half-precision logits convert to float32
        exactly and in order, so their argmax (first maximum on ties) is the same.
        """
        return Sampled(logits.argmax(dim=-1))

    @torch.inference_mode()
    def sample(
        self, logits: torch.Tensor, rows: list[SampleRow], masks: RowMasks | None = None
    ) -> Sampled:
        """Tokens of ``logits`` [B, vocab] for ``rows``, left on the device (see ``Sampled``);
        ``masks``: the tokens each constrained row may sample."""
        logits = logits.float()
        if masks is not None or any(
            r.params.has_penalties or r.banned_ids or r.params.logit_bias for r in rows
        ):
            logits = self._restrict(logits.clone(), rows, masks)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if len(greedy) == len(rows):  # all alike: no gather/scatter of [B, vocab] rows
            tokens = logits.argmax(dim=-1)
        elif not greedy:
            tokens = self._sample(logits, rows)
        else:
            dev = logits.device
            rand = [i for i, r in enumerate(rows) if not r.params.greedy]
            tokens = torch.empty(len(rows), dtype=torch.long, device=dev)
            g_idx, r_idx = to_device(greedy, torch.long, dev), to_device(rand, torch.long, dev)
            tokens[g_idx] = logits[g_idx].argmax(dim=-1)
            tokens[r_idx] = self._sample(logits[r_idx], [rows[i] for i in rand])
        return _with_logprobs(Sampled(tokens), logits, rows)

    def _restrict(
        self, logits: torch.Tensor, rows: list[SampleRow], masks: RowMasks | None
    ) -> torch.Tensor:
        """Penalties (per row: they need the row's tokens), then logit_bias (one add), then
        banned ids (one write) and grammar masks (one masked fill)."""
        dev = logits.device
        banned_rows: list[int] = []
        banned_ids: list[int] = []
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        biases: list[float] = []
        for i, r in enumerate(rows):
            if r.params.has_penalties:
                _apply_penalties(logits[i], r)
            if r.params.logit_bias:
                bias_rows += [i] * len(r.params.logit_bias)
                for token, bias in r.params.logit_bias:
                    bias_ids.append(token)
                    biases.append(bias)
            if r.banned_ids:
                banned_rows += [i] * len(r.banned_ids)
                banned_ids += r.banned_ids
        if bias_rows:
            idx = (to_device(bias_rows, torch.long, dev), to_device(bias_ids, torch.long, dev))
            logits.index_put_(idx, to_device(biases, torch.float32, dev), accumulate=True)
        if banned_rows:
            idx = (to_device(banned_rows, torch.long, dev), to_device(banned_ids, torch.long, dev))
            logits[idx] = float("-inf")
        if masks is not None:
            bits = masks.bits.to(dev, non_blocking=True)
            apply_bitmask(logits, to_device(masks.rows, torch.long, dev), bits)
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        dev = logits.device
        # a tensor even when all rows are alike: CUDA divides by a Python scalar as a product
        # with its reciprocal, which rounds otherwise
        temps = to_device([r.params.temperature for r in rows], torch.float32, dev)
        logits = logits / temps.unsqueeze(1)
        if any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in rows):
            logits = _top_k_top_p(logits, rows)
        probs = logits.softmax(dim=-1)
        if any(r.params.min_p > 0 for r in rows):
            min_p = to_device([r.params.min_p for r in rows], torch.float32, dev)
            cutoff = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
            probs = probs.masked_fill(probs < cutoff, 0.0)
        return (probs / self._noise(probs, rows)).argmax(dim=-1)

    def _noise(self, probs: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.

        Unseeded rows draw from the engine's generator in one call; a seeded row draws from a
        generator seeded by (seed, position), so it does not depend on its neighbours.
        """
        noise = torch.empty_like(probs)
        if any(r.params.seed is None for r in rows):
            noise.exponential_(generator=self._gen)
        for i, r in enumerate(rows):
            if r.params.seed is not None:
                pos = r.num_tokens
                self._seeded.manual_seed(hash((r.params.seed, pos)) & (2**63 - 1))
                noise[i].exponential_(generator=self._seeded)
        return noise


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
    top_k = to_device(
        [r.params.top_k if r.params.top_k > 0 else vocab for r in rows], torch.long, dev
    )
    ranks = torch.arange(vocab, device=dev).unsqueeze(0)
    drop = ranks >= top_k.unsqueeze(1)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # rows without top-p get a bound above 1 so float rounding in cumsum never drops their tail
    top_p = to_device(
        [r.params.top_p if r.params.top_p < 1 else 2.0 for r in rows], torch.float32, dev
    )
    # drop a token when the mass before it already reaches top_p (the first token always stays)
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _with_logprobs(out: Sampled, logits: torch.Tensor, rows: list[SampleRow]) -> Sampled:
    """Logprobs on the device for the rows that ask: of the sampled token and the top N."""
    want = [i for i, r in enumerate(rows) if r.params.logprobs or r.params.top_logprobs]
    if not want:
        return out
    dev = logits.device
    idx = None if len(want) == len(rows) else to_device(want, torch.long, dev)
    lp = (logits if idx is None else logits[idx]).log_softmax(dim=-1)
    picked = out.tokens if idx is None else out.tokens[idx]
    out.logprob_rows = want
    out.top_counts = [rows[i].params.top_logprobs for i in want]
    out.chosen = lp.gather(1, picked.unsqueeze(1)).squeeze(1)
    n = max(out.top_counts)
    out.top_values, out.top_ids = lp.topk(n, dim=-1) if n else (lp[:, :0], lp[:, :0].long())
    return out
