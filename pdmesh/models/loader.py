"""Build the model of a ``ModelSource`` (see ``source``) on a device: weights or random init."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from pdmesh.models.llama import LlamaForCausalLM
from pdmesh.models.source import DEFAULT_MODEL, RANDOM_PREFIX, ModelSource, resolve

__all__ = ["DEFAULT_MODEL", "RANDOM_PREFIX", "ModelSource", "load_model", "resolve"]

log = logging.getLogger(__name__)


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(source.config)
    model = model.to_empty(device=device).to(dtype)
    if source.config.tie_word_embeddings:  # to_empty allocates the tied weight twice
        model.lm_head.weight = model.model.embed_tokens.weight
    if source.path is None:
        _init_random(model)
    else:
        _load_safetensors(model, source.path, dtype, device)
    model.eval().requires_grad_(False)
    log.info(
        "loaded %s (%.1fM params, %s, %s) in %.1fs",
        source.name,
        source.config.num_params / 1e6,
        dtype,
        device,
        time.perf_counter() - t0,
    )
    return model


def _load_safetensors(
    model: LlamaForCausalLM, path: Path, dtype: torch.dtype, device: torch.device
) -> None:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    expected = set(model.state_dict())
    seen: set[str] = set()
    for f in files:
        tensors = load_file(str(f), device=str(device))
        state = {k: v.to(dtype) for k, v in tensors.items() if k in expected}
        model.load_state_dict(state, strict=False)
        seen |= state.keys()
    missing = expected - seen
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"checkpoint in {path} lacks {sorted(missing)[:5]} (of {len(missing)})")


def _init_random(model: LlamaForCausalLM) -> None:
    # unit-variance activations (std 1/sqrt(fan_in)): sharp, varied next-token distributions,
    # so greedy outputs of a random model are not one repeated token and tests can tell apart
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith("bias"):
            p.data.zero_()
        elif name.endswith("embed_tokens.weight"):
            p.data.normal_(0.0, 1.0, generator=gen)
        else:
            p.data.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)


def read_hf_json(path: Path, name: str) -> dict[str, Any]:
    f = path / name
    return json.loads(f.read_text()) if f.is_file() else {}
