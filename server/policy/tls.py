"""The server's TLS: one certificate for both ports, and mutual TLS on gRPC when a client CA is set.

Files are PEM, read once at start-up and checked then (a key that does not match its certificate,
or a file that is not PEM, stops the server with a message naming the file, never its content),
so a misconfiguration cannot surface later as handshakes that fail for every caller.

The HTTP side (health, readiness, metrics) serves HTTPS with the same certificate and does not ask
for client certificates: Kubernetes' HTTPS probes cannot present one, and those routes carry no
data or secrets. The gRPC port, which does, requires them once ``tls_client_ca`` is set.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from logitcache.client.errors import InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerTls:
    """The certificate chain and key the server presents, and the CA its clients' certificates
    must be signed by (None: clients need none)."""

    cert_path: Path
    key_path: Path
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The HTTP side's context: this certificate, no client certificate asked for."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def load_server_tls(cert: str, key: str, client_ca: str = "") -> ServerTls | None:
    """The TLS of ``tls_cert``/``tls_key``/``tls_client_ca`` (paths; empty: not set), or None
    for a plaintext server. InvalidArgument names what is missing or unreadable."""
    if not (cert or key or client_ca):
        return None
    if not (cert and key):
        raise InvalidArgument(
            "TLS needs both tls_cert and tls_key (--tls-cert, --tls-key): the certificate chain "
            "the server presents and its private key",
            fields=("tls_cert", "tls_key"),
        )
    cert_path, key_path = Path(cert), Path(key)
    tls = ServerTls(
        cert_path=cert_path,
        key_path=key_path,
        cert_chain=_read_pem("tls_cert", cert_path),
        private_key=_read_pem("tls_key", key_path),
        client_ca=_read_pem("tls_client_ca", Path(client_ca)) if client_ca else None,
    )
    try:
        tls.ssl_context()
    except ssl.SSLError as e:
        raise InvalidArgument(
            f"tls_cert {str(cert_path)!r} and tls_key {str(key_path)!r} do not make a usable "
            f"certificate ({e.reason or 'invalid PEM'}): is the key the certificate's, unencrypted?",
            fields=("tls_cert", "tls_key"),
        ) from None
    if tls.client_ca is not None:
        try:
            ssl.create_default_context(cafile=client_ca)
        except ssl.SSLError as e:
            raise InvalidArgument(
                f"tls_client_ca {client_ca!r} holds no usable CA certificate "
                f"({e.reason or 'invalid PEM'})",
                fields=("tls_client_ca",),
            ) from None
    log.info(
        "TLS with the certificate in %s%s",
        cert_path,
        f"; gRPC clients need a certificate signed by the CA in {client_ca}" if client_ca else "",
    )
    return tls


def add_grpc_port(server: grpc.aio.Server, address: str, tls: ServerTls | None) -> int:
    """Bind ``address`` (TLS when ``tls`` is given); the port bound, useful after port 0."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.grpc_credentials())


def _read_pem(field: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidArgument(
            f"{field} {str(path)!r} cannot be read: {e.strerror}", fields=(field,)
        ) from None
    if b"-----BEGIN " not in data:
        raise InvalidArgument(f"{field} {str(path)!r} is not a PEM file", fields=(field,))
    return data
