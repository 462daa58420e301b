"""``Tokenizer``: one model's tokenizer, loaded from a Hugging Face directory without transformers.

It reads ``tokenizer.json`` with the ``tokenizers`` library, the special tokens and chat
template(s) from ``tokenizer_config.json`` (or the ``chat_template.jinja`` /
``additional_chat_templates/*.jinja`` files, which win, as in transformers), and the EOS ids
from ``generation_config.json`` / ``config.json``. Inputs are validated here, so a bad token
id is an ``InvalidRequestError`` naming the field instead of text silently missing a piece.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers

from pdmesh.errors import InvalidRequestError
from pdmesh.tokenizer.chat import ChatRequest, ChatTemplate

log = logging.getLogger(__name__)

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_TEMPLATE = "default"
TOOL_USE_TEMPLATE = "tool_use"  # chosen over "default" when the request has tools


@dataclass(frozen=True)
class TokenizerInfo:
    model_name: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    eos_token: str | None
    bos_token: str | None
    has_chat_template: bool


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        name: str,
        special_tokens: dict[str, Any] | None = None,
        chat_templates: dict[str, str] | None = None,
        extra_eos_token_ids: Sequence[int] = (),
    ) -> None:
        """``special_tokens``: template variables (``bos_token``: "<s>", ...) as in transformers'
        ``special_tokens_map``; ``chat_templates``: template source by name ("default", ...)."""
        self._backend = backend
        self.name = name
        self.special_tokens = dict(special_tokens or {})
        self._templates = {k: ChatTemplate(v) for k, v in (chat_templates or {}).items()}
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self._special_id("bos_token")
        eos = [self._special_id("eos_token"), *extra_eos_token_ids]
        self.eos_token_ids = tuple(dict.fromkeys(t for t in eos if t is not None))

    @classmethod
    def from_dir(
        cls, path: Path, name: str | None = None, chat_template: str | None = None
    ) -> Tokenizer:
        """Load from a Hugging Face model directory (needs ``tokenizer.json``);
        ``chat_template``: template source used instead of the directory's (all of them)."""
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json (only fast tokenizers load)")
        config = _read_json(path / "tokenizer_config.json")
        special: dict[str, Any] = {
            k: _token_text(config[k]) for k in SPECIAL_TOKEN_KEYS if config.get(k)
        }
        if extra := config.get("additional_special_tokens"):
            special["additional_special_tokens"] = [_token_text(t) for t in extra]
        tok = cls(
            tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")),
            name or path.name,
            special_tokens=special,
            chat_templates=(
                {DEFAULT_TEMPLATE: chat_template}
                if chat_template is not None
                else _load_chat_templates(path, config)
            ),
            extra_eos_token_ids=_config_eos_ids(path),
        )
        log.info("tokenizer %s: vocab %d, eos %s", tok.name, tok.vocab_size, tok.eos_token_ids)
        return tok

    @property
    def has_chat_template(self) -> bool:
        return bool(self._templates)

    def info(self) -> TokenizerInfo:
        return TokenizerInfo(
            model_name=self.name,
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_token_ids,
            bos_token_id=self.bos_token_id,
            eos_token=self.special_tokens.get("eos_token"),
            bos_token=self.special_tokens.get("bos_token"),
            has_chat_template=self.has_chat_template,
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def check_token_ids(self, token_ids: Sequence[int], field: str) -> None:
        """Raise ``InvalidRequestError`` if an id is outside [0, vocab_size)."""
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                field, f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
            )

    def apply_chat_template(self, request: ChatRequest) -> str:
        """Render ``request`` with the model's template (``tool_use`` when it has tools)."""
        template = self._templates.get(DEFAULT_TEMPLATE)
        if request.tools is not None and TOOL_USE_TEMPLATE in self._templates:
            template = self._templates[TOOL_USE_TEMPLATE]
        if template is None:
            raise InvalidRequestError(
                "messages",
                f"model {self.name!r} has no chat template; send text or token ids instead",
            )
        return template.render(request, self.special_tokens)

    def _special_id(self, key: str) -> int | None:
        text = self.special_tokens.get(key)
        return self._backend.token_to_id(text) if isinstance(text, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: str | dict[str, Any]) -> str:
    # tokenizer_config.json stores special tokens as strings or as serialized AddedTokens
    return value["content"] if isinstance(value, dict) else value


def _load_chat_templates(path: Path, config: dict[str, Any]) -> dict[str, str]:
    files = {}
    if (path / "chat_template.jinja").is_file():
        files[DEFAULT_TEMPLATE] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    for f in sorted((path / "additional_chat_templates").glob("*.jinja")):
        files[f.stem] = f.read_text(encoding="utf-8")
    if files:  # template files take priority over tokenizer_config.json, as in transformers
        return files
    template = config.get("chat_template")
    if isinstance(template, str):
        return {DEFAULT_TEMPLATE: template}
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        return {t["name"]: t["template"] for t in template}
    return {}


def _config_eos_ids(path: Path) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(path / name).get("eos_token_id")
        ids.extend([eos] if isinstance(eos, int) else eos or [])
    return ids
