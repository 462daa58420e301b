"""A small client of the Consul agent's HTTP API: the five calls pdmesh makes.

Own rather than py-consul's asyncio client because that one has one timeout per session, and a
watch needs a long one (blocking queries park for ``wait``) while register/deregister need a
short one; it also passes aiohttp options aiohttp now deprecates. Every call has a timeout.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

DEFAULT_PORT = 8500


class ConsulError(Exception):
    """The agent answered with an error status (bad request, ACL denied, …)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ConsulUnavailable(Exception):
    """No answer: connection refused or reset, a timeout, or a 5xx (e.g. no leader yet)."""


def parse_consul_addr(address: str) -> str:
    """``[http[s]://]host[:port]`` → base URL, e.g. ``127.0.0.1`` → ``http://127.0.0.1:8500``."""
    raw = address.strip()
    if not raw:
        raise ValueError("empty Consul address")
    parts = urlsplit(raw if "//" in raw else f"http://{raw}")
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"Consul address {address!r}: scheme must be http or https")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as e:
        raise ValueError(f"Consul address {address!r}: {e}") from e
    if not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"Consul address {address!r} is not [http[s]://]host[:port]")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


class ConsulAPI:
    def __init__(self, address: str, token: str = "", timeout: float = 5.0) -> None:
        """``address`` as ``parse_consul_addr`` takes it; ``token``: ACL token (may be empty);
        ``timeout``: seconds for each call that does not say otherwise."""
        self.base_url = parse_consul_addr(address)
        self.timeout = timeout
        self._headers = {"X-Consul-Token": token} if token else {}
        self._session: aiohttp.ClientSession | None = None

    async def get(
        self, path: str, params: dict[str, str] | None = None, timeout: float | None = None
    ) -> tuple[Any, int]:
        """GET ``path``; return the JSON body and the ``X-Consul-Index`` (0 when absent)."""
        text, headers = await self._request("GET", path, params, None, timeout)
        try:
            index = int(headers.get("X-Consul-Index", "0"))
        except ValueError:
            index = 0
        return json.loads(text) if text else None, index

    async def put(self, path: str, body: Any = None, params: dict[str, str] | None = None) -> None:
        data = None if body is None else json.dumps(body)
        await self._request("PUT", path, params, data, None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        data: str | None,
        timeout: float | None,
    ) -> tuple[str, dict[str, str]]:
        if self._session is None:  # made here: a session belongs to the running loop
            self._session = aiohttp.ClientSession(headers=self._headers)
        url = self.base_url + quote(path)
        limit = aiohttp.ClientTimeout(total=timeout or self.timeout)
        try:
            async with self._session.request(
                method, url, params=params, data=data, timeout=limit
            ) as response:
                text = await response.text()
                status, headers = response.status, dict(response.headers)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise ConsulUnavailable(f"{method} {url}: {type(e).__name__}: {e}") from e
        if status >= 500:
            raise ConsulUnavailable(f"{method} {url}: HTTP {status}: {text.strip()[:300]}")
        if status >= 400:
            raise ConsulError(status, f"HTTP {status}: {text.strip()[:300]}")
        return text, headers
