"""The reference side: transformers ``generate`` over the same weights as the pdmesh engine.

An HF directory is loaded from the directory; a ``random:<preset>`` model is built from the
preset's config dict and gets pdmesh's random weights copied in (the parameter names are HF's),
so both sides compute the same function.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

from benchmarks.workload import Clock, Timing
from pdmesh.models import loader
from pdmesh.models.llama import LlamaForCausalLM
from pdmesh.models.presets import PRESETS

VERSION: str = transformers.__version__

# HF model_type of each architecture pdmesh implements (presets carry only "architectures")
_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def build_model(
    source: loader.ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    pdmesh_model: LlamaForCausalLM,
) -> Any:
    """The HF model with the weights of ``pdmesh_model`` (read from disk for an HF dir)."""
    transformers.logging.set_verbosity_error()  # generation-config chatter is not a result
    if source.path is not None:
        model: Any = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
        model = model.to(device)
    else:
        preset = PRESETS[source.name.removeprefix(loader.RANDOM_PREFIX)]
        arch = (preset.get("architectures") or ["LlamaForCausalLM"])[0]
        hf_cfg = AutoConfig.for_model(_MODEL_TYPES[arch], **preset)
        with torch.device(device):  # init in place: an 8B model is slow to init on the CPU
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
        model = model.to(device)  # a no-op unless from_config ignored the device context
        model.load_state_dict(pdmesh_model.state_dict(), strict=True)
    return model.eval().requires_grad_(False)


class _Stamps(StoppingCriteria):
    """Called by ``generate`` after each step's token: notes when the first came, stops nothing.

    Only the first call reads the (syncing) clock: a sync on every step would stop the host from
    queueing the next step early, which pdmesh is not held back from either.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.first: float | None = None
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self.first is None:
            self.first = self.clock.now()
        self.steps += 1
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return done  # type: ignore[return-value]


class HFRunner:
    def __init__(self, model: Any, device: torch.device, eos_token_ids: tuple[int, ...]) -> None:
        self.model = model
        self.device = device
        self.clock = Clock(device)
        self.eos = list(eos_token_ids) or None
        self.pad = eos_token_ids[0] if eos_token_ids else 0

    def _generation_config(self, new_tokens: int) -> GenerationConfig:
        # min_new_tokens masks EOS so every row generates exactly new_tokens, like ignore_eos
        return GenerationConfig(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
            use_cache=True,
        )

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], new_tokens: int) -> Timing:
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        stamps = _Stamps(self.clock)
        gen_cfg = self._generation_config(new_tokens)
        t0 = self.clock.now()
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=gen_cfg,
            stopping_criteria=StoppingCriteriaList([stamps]),
        )
        end = self.clock.now()
        if stamps.first is None or stamps.steps != new_tokens:
            raise RuntimeError(f"generate ran {stamps.steps} steps, expected {new_tokens}")
        return Timing(
            batch=len(prompts),
            prompt_len=ids.shape[1],
            new_tokens=new_tokens,
            first_s=stamps.first - t0,
            total_s=end - t0,
            tokens=out[:, ids.shape[1] :].tolist(),
        )
