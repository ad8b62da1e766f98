"""The server's TLS: one certificate for both ports, and mutual TLS on gRPC when a client CA is set.

Files are PEM, checked at start-up (a key that does not match its certificate, or a file that is
not PEM, stops the server with a message naming the file, never its content), so a
misconfiguration cannot surface later as handshakes that fail for every caller.

Renewed files are served without a restart: a handshake looks at the files at most once a second
and, when they changed, loads and checks them again (cert-manager and similar tools replace
certificates in place, weeks before the old ones expire). A pair that does not check out (a key
written before its certificate) is logged and the previous one served until the files change
again.

The HTTP side (health, readiness, metrics) serves HTTPS with the same certificate and does not ask
for client certificates: Kubernetes' HTTPS probes cannot present one, and those routes carry no
data or secrets. The gRPC port, which does, requires them once ``tls_client_ca`` is set.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from logitcache.client.errors import InvalidArgument

log = logging.getLogger(__name__)
RECHECK_S = 1.0  # how often a handshake may look at the files again


@dataclass(frozen=True)
class TlsFiles:
    """Where the certificate chain, its key and the client CA (None: no mutual TLS) are."""

    cert: Path
    key: Path
    client_ca: Path | None

    def stamp(self) -> tuple[tuple[int, int, int], ...]:
        """What changes when any of the files is replaced or rewritten."""
        stamps = []
        for path in (self.cert, self.key, self.client_ca):
            if path is not None:
                try:
                    st = os.stat(path)
                    stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
                except OSError:
                    stamps.append((0, 0, 0))
        return tuple(stamps)


@dataclass(frozen=True)
class LoadedTls:
    """One reading of the files, checked: the PEM, and the HTTP side's context made of it."""

    stamp: tuple[tuple[int, int, int], ...]
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    http_context: ssl.SSLContext

    def grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca
        )


class ServerTls:
    """The TLS of both ports, reloaded when its files change (see the module's docstring)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._current = load_files(files)
        self._checked = time.monotonic()
        self._rejected: tuple[tuple[int, int, int], ...] | None = None
        self._given_to_grpc = self._current

    def current(self) -> LoadedTls:
        """The files' latest pair that checks out; thread-safe (gRPC's handshakes call it from
        its own threads, the HTTP side's from the event loop)."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < RECHECK_S:
                return self._current
            self._checked = now
            stamp = self.files.stamp()
            if stamp in (self._current.stamp, self._rejected):
                return self._current
            try:
                self._current = load_files(self.files)
            except InvalidArgument as e:
                self._rejected = stamp
                log.warning("TLS files changed and do not check out; serving the previous: %s", e)
                return self._current
            log.info("TLS certificate reloaded from %s", self.files.cert)
            return self._current

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._current.grpc_configuration(),
            self._grpc_update,
            require_client_authentication=self.files.client_ca is not None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The HTTP side's context; each handshake moves to the current files' context."""
        context = self._current.http_context
        context.sni_callback = self._switch_http_context
        return context

    def _grpc_update(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question before a handshake: a new configuration, or None to keep its own."""
        current = self.current()
        with self._lock:
            if current is self._given_to_grpc:
                return None
            self._given_to_grpc = current
        return current.grpc_configuration()

    def _switch_http_context(
        self, connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None, context: ssl.SSLContext
    ) -> None:
        current = self.current().http_context
        if current is not context:
            connection.context = current


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
    tls = ServerTls(TlsFiles(Path(cert), Path(key), Path(client_ca) if client_ca else None))
    log.info(
        "TLS with the certificate in %s%s",
        cert,
        f"; gRPC clients need a certificate signed by the CA in {client_ca}" if client_ca else "",
    )
    return tls


def load_files(files: TlsFiles) -> LoadedTls:
    """Read and check the files: InvalidArgument names the file, never quotes it."""
    stamp = files.stamp()
    cert_chain = _read_pem("tls_cert", files.cert)
    private_key = _read_pem("tls_key", files.key)
    client_ca = _read_pem("tls_client_ca", files.client_ca) if files.client_ca else None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as e:
        raise InvalidArgument(
            f"tls_cert {str(files.cert)!r} and tls_key {str(files.key)!r} do not make a usable "
            f"certificate ({e.reason or 'invalid PEM'}): is the key the certificate's, and "
            "unencrypted?",
            fields=("tls_cert", "tls_key"),
        ) from None
    if files.client_ca is not None:
        try:
            ssl.create_default_context(cafile=files.client_ca)
        except ssl.SSLError as e:
            raise InvalidArgument(
                f"tls_client_ca {str(files.client_ca)!r} holds no usable CA certificate "
                f"({e.reason or 'invalid PEM'})",
                fields=("tls_client_ca",),
            ) from None
    if files.stamp() != stamp:
        raise InvalidArgument(f"TLS files changed while they were read ({files.cert})")
    return LoadedTls(stamp, cert_chain, private_key, client_ca, context)


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
