"""``TPShard``: which part of a Llama-family model one tensor-parallel rank holds, Megatron-style.

- Attention heads split evenly over the ranks (``num_heads % tp == 0``); KV heads too where
  there are at least as many as ranks, else each KV head is replicated on ``tp / num_kv_heads``
  consecutive ranks (rank r holds KV head ``r * num_kv_heads // tp``), so each rank's query heads
  find their KV head locally.
- q/k/v and gate/up are column-parallel (a rank holds rows of their weights), o and down
  row-parallel (columns; the rank's partial output is summed by one all-reduce).
- The embedding and lm_head are vocabulary-parallel: rank r holds rows
  ``[r * per, (r + 1) * per)`` of the vocabulary, ``per = ceil(vocab / tp)``; the last rank's
  rows past the vocabulary are zero padding, dropped after the logits' all-gather.

``slice_of(name, shape)`` says which slice of a checkpoint tensor a rank loads, so every rank
reads only its shard from safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.models.config import ModelConfig

# parameter-name suffix -> (dimension split, which range): rows of column-parallel weights,
# columns of row-parallel ones
_HEADS, _KV_HEADS, _FFN, _VOCAB = "heads", "kv_heads", "ffn", "vocab"
_SPLITS: tuple[tuple[str, int, str], ...] = (
    ("self_attn.q_proj.weight", 0, _HEADS),
    ("self_attn.q_proj.bias", 0, _HEADS),
    ("self_attn.k_proj.weight", 0, _KV_HEADS),
    ("self_attn.k_proj.bias", 0, _KV_HEADS),
    ("self_attn.v_proj.weight", 0, _KV_HEADS),
    ("self_attn.v_proj.bias", 0, _KV_HEADS),
    ("self_attn.o_proj.weight", 1, _HEADS),
    ("mlp.gate_proj.weight", 0, _FFN),
    ("mlp.up_proj.weight", 0, _FFN),
    ("mlp.down_proj.weight", 1, _FFN),
    ("embed_tokens.weight", 0, _VOCAB),
    ("lm_head.weight", 0, _VOCAB),
)


@dataclass(frozen=True)
class TPShard:
    rank: int
    size: int
    num_heads: int  # this rank's query heads
    num_kv_heads: int  # this rank's KV heads (1 when replicated)
    head_dim: int
    heads: range  # which of the model's query heads
    kv_heads: range  # which of the model's KV heads
    ffn: range  # which rows of gate/up (columns of down)
    vocab: range  # which vocabulary ids; the last rank may run past the vocabulary
    vocab_size: int  # the model's vocabulary

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int = 0, size: int = 1) -> TPShard:
        """Rank ``rank``'s shard of ``cfg`` at TP size ``size``; raises ``ValueError`` naming
        what does not divide."""
        for reason in shard_errors(cfg, size):
            raise ValueError(reason)
        heads = cfg.num_heads // size
        if cfg.num_kv_heads >= size:
            kv = cfg.num_kv_heads // size
            kv_heads = range(rank * kv, (rank + 1) * kv)
        else:
            first = rank * cfg.num_kv_heads // size
            kv_heads = range(first, first + 1)
        ffn = cfg.intermediate_size // size
        per = -(-cfg.vocab_size // size)
        return cls(
            rank=rank,
            size=size,
            num_heads=heads,
            num_kv_heads=len(kv_heads),
            head_dim=cfg.head_dim,
            heads=range(rank * heads, (rank + 1) * heads),
            kv_heads=kv_heads,
            ffn=range(rank * ffn, (rank + 1) * ffn),
            vocab=range(rank * per, (rank + 1) * per),
            vocab_size=cfg.vocab_size,
        )

    @property
    def vocab_rows(self) -> int:
        """Rows of this rank's embedding and lm_head, padding included."""
        return len(self.vocab)

    def slice_of(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """``(dim, start, stop)`` of the checkpoint tensor ``name`` (full ``shape``) that this
        rank holds; None: the whole tensor (norms, and everything at TP size 1). ``stop`` may
        pass the tensor's end for the padded vocabulary."""
        if self.size == 1:
            return None
        for suffix, dim, kind in _SPLITS:
            if name.endswith(suffix):
                return (dim, *self._bounds(kind))
        return None

    def _bounds(self, kind: str) -> tuple[int, int]:
        if kind == _VOCAB:
            return self.vocab.start, self.vocab.stop
        if kind == _FFN:
            return self.ffn.start, self.ffn.stop
        heads = self.heads if kind == _HEADS else self.kv_heads
        return heads.start * self.head_dim, heads.stop * self.head_dim


def shard_errors(cfg: ModelConfig, size: int) -> list[str]:
    """Why ``cfg`` cannot be split over ``size`` ranks (empty: it can)."""
    if size < 1:
        return [f"--tp-size={size} must be at least 1"]
    errors = []
    if cfg.num_heads % size:
        errors.append(f"num_heads={cfg.num_heads} is not divisible by --tp-size={size}")
    if cfg.num_kv_heads >= size and cfg.num_kv_heads % size:
        errors.append(f"num_kv_heads={cfg.num_kv_heads} is not divisible by --tp-size={size}")
    if cfg.num_kv_heads < size and size % cfg.num_kv_heads:
        errors.append(
            f"--tp-size={size} is not a multiple of num_kv_heads={cfg.num_kv_heads} "
            "(each KV head is replicated on tp / num_kv_heads ranks)"
        )
    if cfg.intermediate_size % size:
        errors.append(
            f"intermediate_size={cfg.intermediate_size} is not divisible by --tp-size={size}"
        )
    return errors
