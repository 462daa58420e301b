"""Build the model of a ``ModelSource`` (see ``source``) on a device: weights or random init.

Under tensor parallelism each rank builds only its shard (``TPShard``): from safetensors it reads
just its slice of each tensor (``safe_open(...).get_slice``, no full copy in memory), and random
weights are drawn for the whole tensor in the same order as at TP size 1, then sliced, so every
TP size holds the same model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from pdmesh.distributed import TPGroup
from pdmesh.models.llama import LlamaForCausalLM
from pdmesh.models.sharding import TPShard
from pdmesh.models.source import DEFAULT_MODEL, RANDOM_PREFIX, ModelSource, resolve

__all__ = ["DEFAULT_MODEL", "RANDOM_PREFIX", "ModelSource", "load_model", "resolve"]

log = logging.getLogger(__name__)


def load_model(
    source: ModelSource, dtype: torch.dtype, device: torch.device, tp: TPGroup | None = None
) -> LlamaForCausalLM:
    """The model (``tp``: this rank's shard of it) in ``dtype`` on ``device``."""
    t0 = time.perf_counter()
    tp = tp or TPGroup.single()
    shard = TPShard.of(source.config, tp.rank, tp.size)
    with torch.device("meta"):
        model = LlamaForCausalLM(source.config, shard, tp)
    model = model.to_empty(device=device).to(dtype)
    if source.config.tie_word_embeddings:  # to_empty allocates the tied weight twice
        model.lm_head.weight = model.model.embed_tokens.weight
    if source.path is None:
        _init_random(model)
    else:
        _load_safetensors(model, source.path, dtype, device)
    model.eval().requires_grad_(False)
    log.info(
        "loaded %s (%.1fM params%s, %s, %s) in %.1fs",
        source.name,
        source.config.num_params / 1e6,
        f", tp rank {tp.rank} of {tp.size}" if tp.size > 1 else "",
        dtype,
        device,
        time.perf_counter() - t0,
    )
    return model


def _load_safetensors(
    model: LlamaForCausalLM, path: Path, dtype: torch.dtype, device: torch.device
) -> None:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    params = model.state_dict()
    seen: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name in params:
                    _copy_shard(params[name], st.get_slice(name), name, model.shard)
                    seen.add(name)
    missing = set(params) - seen
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"checkpoint in {path} lacks {sorted(missing)[:5]} (of {len(missing)})")


def _copy_shard(param: torch.Tensor, source: Any, name: str, shard: TPShard) -> None:
    """``param`` = this rank's slice of checkpoint tensor ``source`` (a safetensors slice or a
    full tensor), zero where the padded vocabulary runs past it."""
    full = tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)
    cut = shard.slice_of(name, full)
    if cut is None:
        param.copy_(source[:])
        return
    dim, start, stop = cut
    stop_in = min(stop, full[dim])
    index = [slice(None)] * len(full)
    index[dim] = slice(start, stop_in)
    part = source[tuple(index)]
    if stop_in - start == param.shape[dim]:
        param.copy_(part)
    else:
        param.zero_()
        param.narrow(dim, 0, stop_in - start).copy_(part)


def _init_random(model: LlamaForCausalLM) -> None:
    # unit-variance activations (std 1/sqrt(fan_in)): sharp, varied next-token distributions,
    # so greedy outputs of a random model are not one repeated token and tests can tell apart.
    # Every tensor is drawn whole, in the order of the unsharded model, and then cut to this
    # rank's shard: the same weights at every TP size.
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.device("meta"):
        whole = LlamaForCausalLM(model.config)
    params = dict(model.named_parameters())
    for name, shape_of in whole.named_parameters():
        full = torch.empty(shape_of.shape, dtype=params[name].dtype, device=device)
        if name.endswith("norm.weight"):
            full.fill_(1.0)
        elif name.endswith("bias"):
            full.zero_()
        elif name.endswith("embed_tokens.weight"):
            full.normal_(0.0, 1.0, generator=gen)
        else:
            full.normal_(0.0, full.shape[-1] ** -0.5, generator=gen)
        with torch.no_grad():
            _copy_shard(params[name].data, full, name, model.shard)


def read_hf_json(path: Path, name: str) -> dict[str, Any]:
    f = path / name
    return json.loads(f.read_text()) if f.is_file() else {}
