"""The one error a KV transfer raises on purpose."""

from __future__ import annotations


class KVTransferError(Exception):
    """A KV write failed or missed its deadline; the message names the peer (``peer``).

    The room the write belonged to must be failed: its destination pages hold partial data.
    """

    def __init__(self, message: str, peer: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.peer = peer
