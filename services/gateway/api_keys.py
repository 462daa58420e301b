"""``APIKeys``: the keys the gateway accepts (``--api-key``, a comma-separated list, plus the
lines of ``--api-key-file``), checked in constant time.

Only SHA-256 digests of the keys are kept. A presented key is hashed and compared with every
digest by ``hmac.compare_digest``, without stopping at a match: the time an answer takes says
neither how much of a guess was right, nor how long the keys are, nor which key matched.
A match names the key by its position (``key#2``), so per-client limits and logs can tell
clients apart without ever holding or printing the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path


class APIKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in dict.fromkeys(keys) if k]

    @classmethod
    def load(cls, listed: str, path: str = "") -> APIKeys:
        """The keys of ``--api-key`` (comma-separated) and of the file at ``path`` (one per
        line; blank lines and lines starting with # are skipped). ``ValueError`` when the file
        cannot be read or holds no key."""
        keys = [k.strip() for k in listed.split(",")]
        if path:
            try:
                lines = Path(path).read_text().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"--api-key-file={path}: {e}") from None
            from_file = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
            if not from_file:
                raise ValueError(f"--api-key-file={path}: no key in it (one key per line)")
            keys += from_file
        for key in keys:
            if any(c.isspace() for c in key):
                # a Bearer token cannot carry whitespace: such a key could never match
                raise ValueError("an API key must not contain whitespace")
        return cls(keys)

    def __bool__(self) -> bool:
        """Whether any key is set (no key: the API is open)."""
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def match(self, authorization: str) -> int | None:
        """The index of the key an ``Authorization: Bearer <key>`` header carries; None when
        it carries none of them (or is not a Bearer header)."""
        scheme, _, token = authorization.partition(" ")
        presented = _digest(token.strip())
        found: int | None = None
        for i, digest in enumerate(self._digests):
            # every digest is compared: no early exit that timing could reveal
            if hmac.compare_digest(presented, digest) and found is None:
                found = i
        if scheme.lower() != "bearer":
            return None
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
