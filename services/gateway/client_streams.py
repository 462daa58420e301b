"""``ClientStreams``: how many generation requests each client has open at the gateway, and
the per-client limit on them (``--max-streams-per-client``).

A client is its API key when keys are required (so many users behind one proxy address are
told apart, and one key cannot get around the limit from many addresses), else its address.
A request counts from when the gateway takes it until its answer ended — for a stream, until
the last event was sent or the client went away — whether it streams or not, since either way
it holds router and worker capacity. Everything runs on the server's event loop: no locks.
"""

from __future__ import annotations


class ClientStreams:
    def __init__(self, limit: int) -> None:
        """``limit``: open requests per client; <= 0: no limit (nothing is counted)."""
        self.limit = limit
        self._open: dict[str, int] = {}

    def __bool__(self) -> bool:
        return self.limit > 0

    def try_open(self, client: str) -> bool:
        """Count one more open request for ``client``; False (and nothing counted) when it
        already has ``limit`` open."""
        count = self._open.get(client, 0)
        if count >= self.limit:
            return False
        self._open[client] = count + 1
        return True

    def close(self, client: str) -> None:
        count = self._open.get(client, 0) - 1
        if count > 0:
            self._open[client] = count
        else:  # forget idle clients: the table holds only clients with requests open
            self._open.pop(client, None)

    def open_count(self, client: str) -> int:
        return self._open.get(client, 0)

    @property
    def clients(self) -> int:
        """Clients with at least one request open."""
        return len(self._open)


def client_id(key_index: int | None, address: str | None) -> str:
    """How the limit names a client: ``key#<n>`` (never the key itself) or ``addr:<host>``."""
    if key_index is not None:
        return f"key#{key_index}"
    return f"addr:{address or 'unknown'}"
