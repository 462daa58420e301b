"""``GatewayConfig``: the gateway's flags, one dataclass field per ``--flag``."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.config import flag
from pdmesh.rpc.config import ServerConfig, grace_flag
from services.gateway.api_keys import APIKeys

DEFAULT_PORT = 8000
# the SGLang router's default --request-id-headers
DEFAULT_REQUEST_ID_HEADERS = ("x-request-id", "x-correlation-id", "x-trace-id", "request-id")


@dataclass(frozen=True)
class GatewayConfig(ServerConfig):
    router: str = flag(
        "127.0.0.1:50051",
        "host:port of the router's gRPC service; a comma-separated list spreads requests over "
        "several routers (round-robin, moving on to the next one when a router is unreachable)",
    )
    host: str = flag(
        "127.0.0.1", "address to listen on; 0.0.0.0 or :: to accept other hosts (set --api-key!)"
    )
    port: int = flag(DEFAULT_PORT, "HTTP port")
    model_name: str = flag(
        "",
        "the model name /v1/models lists and requests must name; empty: the name the router's "
        "workers report (asked on first use)",
    )
    api_key: str = flag(
        "",
        "require 'Authorization: Bearer <key>' on every endpoint but /health and /metrics; a "
        "comma-separated list accepts any of the keys (compared in constant time, never "
        "logged); empty (and no --api-key-file): no auth. Prefer the environment variable or "
        "--api-key-file (flags show in ps)",
        env="PDMESH_API_KEY",
        secret=True,
    )
    api_key_file: str = flag(
        "",
        "file of API keys, one per line (blank lines and # comments skipped), accepted besides "
        "--api-key's",
        env="PDMESH_API_KEY_FILE",
    )
    max_streams_per_client: int = flag(
        0,
        "generation requests (streamed or not) one client may have open at once; one more is "
        "refused with HTTP 429 (code too_many_streams). A client is its API key when keys are "
        "required, else its address; 0: no limit",
    )
    max_body_bytes: int = flag(
        4 * 1024 * 1024, "largest request body accepted; larger ones get HTTP 413"
    )
    request_timeout: float = flag(
        600.0, "deadline in seconds of each router call (a whole generation); past it: HTTP 504"
    )
    router_stream: bool = flag(
        True,
        "carry all of this process's requests to a router on one long-lived RouterService."
        "Stream call (the router sends each engine step's output of every request in one "
        "message); --no-router-stream: one Generate call per request and choice. A router "
        "that does not implement Stream (an older pdmesh) gets Generate calls either way, "
        "after one warning in the log",
    )
    migration_limit: int = flag(
        3,
        "how many times one request may move to another router after the router streaming it "
        "went away mid-stream (UNAVAILABLE): it continues there from the prompt and the tokens "
        "the client already has, as workers' requests migrate; 0: such a stream ends with the "
        "error. A request that received nothing yet always moves to the next router",
    )
    workers: int = flag(
        1,
        "gateway processes sharing the HTTP port, for when one process's CPU is not enough: "
        "each its own uvicorn server and router streams, the kernel spreading connections over "
        "them. With more than one, each process registers in Consul on its own (service id "
        "<id>-<k> for worker k, meta metrics_port its own /metrics port, a free one); /metrics "
        "on the HTTP port then answers for whichever process takes the connection. If one "
        "process exits, the others are stopped and the gateway exits non-zero",
    )
    tokenizer: str = flag(
        "",
        "host:port of a tokenizer service, used only to spell out the tokens of "
        "logprobs/top_logprobs; empty: they read 'token_id:<id>'",
    )
    request_id_headers: str = flag(
        ",".join(DEFAULT_REQUEST_ID_HEADERS),
        "comma-separated request headers a request's id is taken from, the first one present "
        "(and valid: up to 128 of A-Z a-z 0-9 ._:/+=-) wins; the id is echoed in the "
        "x-request-id response header, names the response (chatcmpl-<id>) and is the router's "
        "request_id; none present: a new random id; empty list: always a new one",
    )
    cors_allowed_origins: str = flag(
        "",
        "comma-separated origins browsers may call the API from (CORS, e.g. "
        "https://app.example.com; * for any); empty: no CORS headers, so browsers on other "
        "origins cannot read responses",
    )
    grace_period: float = grace_flag(5.0, "open requests")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.routers:
            raise ValueError("--router must name at least one host:port")
        if self.max_body_bytes <= 0:
            raise ValueError(f"--max-body-bytes={self.max_body_bytes} must be > 0")
        if self.max_streams_per_client < 0:
            raise ValueError(f"--max-streams-per-client={self.max_streams_per_client} must be >= 0")
        self.api_keys()  # an unreadable --api-key-file fails at startup
        if self.request_timeout <= 0:
            raise ValueError(f"--request-timeout={self.request_timeout} must be > 0")
        if self.workers < 1:
            raise ValueError(f"--workers={self.workers} must be >= 1")
        if self.migration_limit < 0:
            raise ValueError(f"--migration-limit={self.migration_limit} must be >= 0")
        for origin in self.cors_origins:
            # browsers send Origin as scheme://host[:port], never with a path
            if origin != "*" and ("://" not in origin or origin.endswith("/")):
                raise ValueError(
                    f"--cors-allowed-origins: {origin!r} is not * or scheme://host[:port]"
                )
        for header in self.request_id_header_names:
            if not header.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"--request-id-headers: {header!r} is not a header name")

    def api_keys(self) -> APIKeys:
        """The keys of --api-key and --api-key-file (the file is read on each call)."""
        return APIKeys.load(self.api_key, self.api_key_file)

    @property
    def routers(self) -> tuple[str, ...]:
        return _split(self.router)

    @property
    def request_id_header_names(self) -> tuple[str, ...]:
        return tuple(h.lower() for h in _split(self.request_id_headers))

    @property
    def cors_origins(self) -> tuple[str, ...]:
        return _split(self.cors_allowed_origins)


def _split(values: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in values.split(",") if v.strip())
