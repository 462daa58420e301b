"""Certificates made in the test, for TLS and mutual TLS between real processes.

    pki = make_pki(tmp_path)               # a CA, a server cert (127.0.0.1, localhost), a client
    pki.server_flags()                     # --tls-cert/--tls-key/--tls-ca of a mesh service
    pki.tls_config()                       # the same as a TLSConfig, for a test's own channels
    rogue = make_pki(tmp_path / "rogue")   # another CA: its certificates are not trusted

Keys are EC P-256: generating one takes a millisecond, where RSA takes a noticeable while on
a 2-core machine. Every mesh process presents the one "server" certificate; its extended key
usage allows both server and client authentication, as one identity per process would in a
deployment.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pdmesh.rpc.tls import TLSConfig

VALIDITY = datetime.timedelta(days=2)


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path  # serves 127.0.0.1 and localhost; usable as a client certificate too
    key: Path
    client_cert: Path  # client authentication only
    client_key: Path

    def server_flags(self) -> list[str]:
        """The flags that make a mesh service serve and dial with mutual TLS."""
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]

    def tls_config(self, client_auth: bool = True) -> TLSConfig:
        """What a test's own channels use to reach the mesh (presenting the client cert)."""
        return TLSConfig(
            tls_cert=str(self.client_cert),
            tls_key=str(self.client_key),
            tls_ca=str(self.ca),
            tls_client_auth=client_auth,
        )


def make_pki(directory: Path, name: str = "pdmesh test") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca = _write_cert(directory / "ca.pem", ca_cert)
    server = _leaf(
        directory / "server",
        f"{name} service",
        ca_cert,
        ca_key,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    client = _leaf(
        directory / "client",
        f"{name} client",
        ca_cert,
        ca_key,
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        [],
    )
    return Pki(ca, *server, *client)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks of a test may differ
        .not_valid_after(now + VALIDITY)
    )


def _leaf(
    stem: Path,
    common_name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    usages: list[x509.ObjectIdentifier],
    names: list[x509.GeneralName],
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _builder(subject, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    key_path = stem.with_suffix(".key")
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return _write_cert(stem.with_suffix(".pem"), cert), key_path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path
