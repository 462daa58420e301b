"""TLS and mutual TLS for every gRPC hop: the one place channels and server ports are made.

One ``TLSConfig`` per process, from the same flags on every service (``--tls-cert``,
``--tls-key``, ``--tls-ca``; ``services/mesh.py`` adds them), used both ways:

- as a server: with a certificate and key it serves TLS; with a CA too it requires client
  certificates signed by that CA (mutual TLS), unless ``--no-tls-client-auth``;
- as a client: with a CA or a certificate it dials TLS, verifies the server against the CA
  (the system's roots when none is given) and presents its own certificate when it has one.

    tls = TLSConfig(tls_cert="svc.pem", tls_key="svc.key", tls_ca="ca.pem")
    channel = tls.channel("10.0.0.5:50051", interceptors=client_interceptors())
    port = tls.add_port(server, "127.0.0.1:0")

An empty config is plaintext both ways (the default, for a loopback mesh). The whole mesh uses
one mode: a TLS client cannot talk to a plaintext server, nor the reverse. The files are read
and checked (the key matches the certificate, the CA parses) when the config is built, so a
bad path fails at startup with the flag's name; their contents are never logged.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from pdmesh.config import flag

ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class TLSConfig:
    tls_cert: str = flag(
        "",
        "PEM certificate (chain) of this process: with --tls-key its gRPC servers serve TLS, "
        "and its clients present it to servers that require client certificates (mTLS); "
        "empty: plaintext",
        env="PDMESH_TLS_CERT",
    )
    tls_key: str = flag("", "PEM private key of --tls-cert", env="PDMESH_TLS_KEY")
    tls_ca: str = flag(
        "",
        "PEM CA bundle: this process's clients dial TLS and verify servers against it, and its "
        "servers require client certificates signed by it (mutual TLS); empty: servers take "
        "any client, and clients given only --tls-cert verify against the system's roots",
        env="PDMESH_TLS_CA",
    )
    tls_client_auth: bool = flag(
        True,
        "with --tls-ca, servers require a client certificate signed by it (mutual TLS); "
        "--no-tls-client-auth serves TLS to any client (clients still verify servers)",
    )
    tls_server_name: str = flag(
        "",
        "name server certificates are checked against instead of the host dialed (when "
        "certificates name a DNS name but peers are dialed by IP, as Consul reports them)",
        env="PDMESH_TLS_SERVER_NAME",
    )

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            _read(name, getattr(self, name))
        # the same parsers a handshake would use, so a mismatch fails here, naming the flag
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.tls_cert:
            try:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            except (ssl.SSLError, ValueError) as e:
                raise ValueError(
                    f"--tls-cert={self.tls_cert} / --tls-key={self.tls_key}: not a PEM "
                    f"certificate and its matching private key ({e})"
                ) from None
        if self.tls_ca:
            try:
                context.load_verify_locations(cafile=self.tls_ca)
            except (ssl.SSLError, ValueError) as e:
                raise ValueError(f"--tls-ca={self.tls_ca}: no PEM CA certificate ({e})") from None

    # -- what this process does ------------------------------------------------------------

    @property
    def serves_tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def requires_client_cert(self) -> bool:
        return self.serves_tls and bool(self.tls_ca) and self.tls_client_auth

    @property
    def dials_tls(self) -> bool:
        return bool(self.tls_cert or self.tls_ca)

    @property
    def mode(self) -> str:
        """How this process serves, for log lines: "mTLS", "TLS" or "plaintext"."""
        if self.requires_client_cert:
            return "mTLS"
        return "TLS" if self.serves_tls else "plaintext"

    # -- credentials -------------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials:
        if not self.serves_tls:
            raise ValueError("no --tls-cert/--tls-key to serve TLS with")
        pair = (_read("tls_key", self.tls_key), _read("tls_cert", self.tls_cert))
        return grpc.ssl_server_credentials(
            [pair],
            root_certificates=_read("tls_ca", self.tls_ca) if self.requires_client_cert else None,
            require_client_auth=self.requires_client_cert,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read("tls_ca", self.tls_ca),
            private_key=_read("tls_key", self.tls_key),
            certificate_chain=_read("tls_cert", self.tls_cert),
        )

    def channel_options(self, options: ChannelOptions = ()) -> list[tuple[str, Any]]:
        merged = list(options)
        if self.dials_tls and self.tls_server_name:
            merged.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return merged

    # -- channels and ports ------------------------------------------------------------------

    def channel(
        self,
        address: str,
        options: ChannelOptions = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> grpc.aio.Channel:
        """A ``grpc.aio`` channel to ``host:port``: TLS when this config dials TLS."""
        opts = self.channel_options(options)
        if not self.dials_tls:
            return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)
        return grpc.aio.secure_channel(
            address, self.channel_credentials(), options=opts, interceptors=interceptors
        )

    def sync_channel(self, address: str, options: ChannelOptions = ()) -> grpc.Channel:
        """A blocking channel (probes, tests), with the same rules as ``channel``."""
        opts = self.channel_options(options)
        if not self.dials_tls:
            return grpc.insecure_channel(address, options=opts)
        return grpc.secure_channel(address, self.channel_credentials(), options=opts)

    def add_port(self, server: grpc.Server | grpc.aio.Server, address: str) -> int:
        """Bind ``address`` on ``server`` (sync or aio) with this config's security; return the
        port bound (0 when grpc could not bind, as ``add_insecure_port`` does)."""
        if self.serves_tls:
            return int(server.add_secure_port(address, self.server_credentials()))
        return int(server.add_insecure_port(address))

    def flags(self) -> list[str]:
        """The command-line flags that give a child process this config (the launcher's)."""
        args: list[str] = []
        for name in ("tls_cert", "tls_key", "tls_ca", "tls_server_name"):
            if value := getattr(self, name):
                args += ["--" + name.replace("_", "-"), str(value)]
        if not self.tls_client_auth:
            args.append("--no-tls-client-auth")
        return args


def _read(name: str, path: str) -> bytes | None:
    """The file's bytes (None for an empty path); a ``ValueError`` naming the flag otherwise."""
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"--{name.replace('_', '-')}={path}: {e.strerror or e}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"--{name.replace('_', '-')}={path}: not a PEM file")
    return data


# the default of every client and server: a loopback mesh needs no TLS
PLAINTEXT = TLSConfig()
