"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2/3, SmolLM) in plain PyTorch.

Parameter names follow Hugging Face checkpoints so ``load_state_dict`` takes them as they are.
The forward runs over a flat batch of tokens from many sequences; attention goes through the
paged KV cache (``pdmesh.layers.attention``).

Under tensor parallelism every module is built at its rank's shard (``TPShard``: heads, KV heads,
FFN rows, vocabulary rows) and the forward adds the collectives of Megatron-style sharding: one
all-reduce after o_proj and one after down_proj, one after the vocabulary-parallel embedding,
and one all-gather of the logits. At TP size 1 the shard is the whole model and every
collective is the identity.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pdmesh.distributed import TPGroup
from pdmesh.layers import cuda_ops, gemv
from pdmesh.layers.attention import AttentionMetadata, layer_rows, paged_attention
from pdmesh.models.config import ModelConfig
from pdmesh.models.sharding import TPShard


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``weight * norm(x)``; with ``residual``: ``residual += x`` in place first and the
        sum is normalised (the next layer's input, one fused kernel on CUDA)."""
        if cuda_ops.enabled(x):
            return cuda_ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            residual.add_(x)
            x = residual
        # normalise in fp32 like the reference implementation, then scale in the model dtype
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _qk_rows(q: torch.Tensor, t: int, heads: int, head_dim: int) -> torch.Tensor:
    """[t, heads, head_dim] view over q's and k's heads in the fused qkv output (``q`` is its
    first slice: same storage and row stride)."""
    return q.as_strided((t, heads, head_dim), (q.stride(0), head_dim, 1))


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear``; one half-precision row on CUDA goes to the GEMV kernel (``gemv.py``)."""
    if gemv.applies(x, weight) and cuda_ops.enabled(x):
        return gemv.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _fuse(a: nn.Linear, b: nn.Linear, c: nn.Linear | None, name: str) -> torch.Tensor:
    parts = [m for m in (a, b, c) if m is not None]
    fused = torch.cat([getattr(m, name).data for m in parts])
    start = 0
    for m in parts:
        n = getattr(m, name).shape[0]
        setattr(m, name, nn.Parameter(fused[start : start + n], requires_grad=False))
        start += n
    return fused


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by ``factor``, short ones kept, a smooth ramp between
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    mid = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(mid, smoothed, scaled)


def rope_cos_sin(cfg: ModelConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rope_inv_freq(cfg)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, head_dim], halves layout (HF rotate_half)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, head_dim]; cos/sin: [T, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: TPShard, tp: TPGroup) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            shard.num_heads,
            shard.num_kv_heads,
            cfg.head_dim,
        )
        self.tp = tp
        h, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
        # row-parallel: no bias (it would be added once per rank by the all-reduce)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.scale = hd**-0.5
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # fuse_projections()

    def fuse_projections(self) -> None:
        """Put q/k/v weights (and biases) in one tensor; the three parameters become views of
        it, so state_dict and load_state_dict keep working on the HF names."""
        weight = _fuse(self.q_proj, self.k_proj, self.v_proj, "weight")
        bias = (
            _fuse(self.q_proj, self.k_proj, self.v_proj, "bias")
            if self.q_proj.bias is not None
            else None
        )
        self.qkv = (weight, bias)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],  # this layer's K and V rows (``layer_rows``)
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv is not None:  # fused on CUDA: one GEMM instead of three
            qd, kd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q2, k2, v2 = _linear(x, self.qkv[0], self.qkv[1]).split([qd, kd, kd], dim=-1)
            q = q2.view(t, self.num_heads, self.head_dim)
            k = k2.view(t, self.num_kv_heads, self.head_dim)
            v = v2.view(t, self.num_kv_heads, self.head_dim)
        else:
            q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cuda_ops.enabled(q) and self.qkv is not None and not self.qk_norm:
            # q and k heads are adjacent in each row of the fused output: one launch for both
            heads = self.num_heads + self.num_kv_heads
            cuda_ops.rope_(_qk_rows(q2, t, heads, self.head_dim), cos, sin)
        elif cuda_ops.enabled(q):
            cuda_ops.rope_(q, cos, sin)
            cuda_ops.rope_(k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = paged_attention(q, k, v, kv[0], kv[1], meta, self.scale)
        return self.tp.all_reduce(_linear(o.reshape(t, -1), self.o_proj.weight))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: TPShard, tp: TPGroup) -> None:
        super().__init__()
        ffn = len(shard.ffn)
        self.tp = tp
        self.gate_proj = nn.Linear(cfg.hidden_size, ffn, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, cfg.hidden_size, bias=False)

        self.gate_up: torch.Tensor | None = None  # fuse_projections()

    def fuse_projections(self) -> None:
        self.gate_up = _fuse(self.gate_proj, self.up_proj, None, "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None and cuda_ops.enabled(x):
            if gemv.applies(x, self.gate_up):
                h = gemv.silu_mul_linear(x, self.gate_up)
            else:
                h = cuda_ops.silu_mul(F.linear(x, self.gate_up))
            return self.tp.all_reduce(_linear(h, self.down_proj.weight))
        return self.tp.all_reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: TPShard, tp: TPGroup) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, shard, tp)
        self.mlp = MLP(cfg, shard, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, residual)`` -> the same for the next layer: the residual stream is summed
        inside each norm (``residual + x``), which fuses the add into the norm's kernel."""
        if residual is None:  # first layer: x (the embedding) starts the residual stream
            residual = x
            h = self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, kv, meta)
        h = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: TPShard, tp: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(shard.vocab_rows, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, shard, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, cfg: ModelConfig, shard: TPShard | None = None, tp: TPGroup | None = None
    ) -> None:
        """``shard``/``tp``: this rank's part of the model and its group (None: all of it)."""
        super().__init__()
        self.config = cfg
        self.tp = tp or TPGroup.single()
        self.shard = shard or TPShard.of(cfg, self.tp.rank, self.tp.size)
        self.model = LlamaModel(cfg, self.shard, self.tp)
        self.lm_head = nn.Linear(cfg.hidden_size, self.shard.vocab_rows, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor,  # [num_pages, layers, 2, page_size, kv_heads, head_dim]
        meta: AttentionMetadata,
        rope: tuple[torch.Tensor, torch.Tensor],  # cos/sin tables [max_positions, head_dim]
    ) -> torch.Tensor:  # [T, hidden] after the final norm
        x = self._embed(input_ids)
        cos, sin = rope[0][positions].to(x.dtype), rope[1][positions].to(x.dtype)
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, cos, sin, layer_rows(kv_cache, i), meta, residual)
        return self.model.norm(x, residual)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.model.embed_tokens(input_ids)
        # vocabulary-parallel: each rank looks up the ids in its rows, zeros for the others,
        # and the all-reduce puts every token's row together
        local = input_ids - self.shard.vocab.start
        outside = (local < 0) | (local >= self.shard.vocab_rows)
        x = self.model.embed_tokens(local.masked_fill(outside, 0))
        x.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(x)

    def fuse_projections(self) -> None:
        """One GEMM for q/k/v and one for gate/up per layer (CUDA: fewer, larger launches)."""
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = _linear(hidden, self.lm_head.weight)
        if self.tp.size > 1:  # the vocabulary shards side by side, the padding dropped
            logits = self.tp.all_gather_last(logits)[:, : self.config.vocab_size]
        return logits.float()
