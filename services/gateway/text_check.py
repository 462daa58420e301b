"""Refuse request bodies whose strings cannot travel as UTF-8.

JSON may spell a lone UTF-16 surrogate (``"\\ud800"``) and Python's parser accepts it, but such
a string has no UTF-8 form: protobuf refuses to put it in a string field. Found by the HTTP
fuzzer as a 500 (UnicodeEncodeError while building the router request); it is the client's
error, so it is a 400 naming the field, checked once per body before anything is built.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from services.gateway.errors import APIError


def check_text(body: BaseModel) -> None:
    """Raise a 400 naming the first string (or object key) in ``body`` that is not valid
    Unicode text."""
    where = _bad_string(body.model_dump(), "")
    if where is not None:
        raise APIError(
            400,
            f"{where or 'body'}: contains a lone UTF-16 surrogate (e.g. \\ud800 without its "
            "pair); strings must be valid Unicode",
            param=where or None,
        )


def _bad_string(value: Any, path: str) -> str | None:
    """The path (``messages[0].content``) of the first bad string under ``value``."""
    if isinstance(value, str):
        return path if not _encodable(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not _encodable(key):
                return path or "body"
            if (found := _bad_string(item, inner)) is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if (found := _bad_string(item, f"{path}[{i}]")) is not None:
                return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
