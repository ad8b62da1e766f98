"""The client's side of TLS: which credentials a channel uses, and why a server refused them.

``client_tls`` resolves ``Client(target, tls=..., ca=..., cert=..., key=...)`` against the
environment (``LOGITCACHE_CA``, ``LOGITCACHE_CERT``, ``LOGITCACHE_KEY``, ``LOGITCACHE_TLS=1``), so
that clients made where the caller cannot pass arguments (a trainer's DataLoader workers, the CLI)
connect the same way. A CA, a certificate or ``LOGITCACHE_TLS`` turns TLS on; ``tls=False`` keeps
a channel plaintext whatever the environment says.

gRPC reports every handshake that failed as UNAVAILABLE "Socket closed" and retries it as if the
server were restarting. ``tls_mismatch`` says what it was instead (a plaintext client at a TLS
port, a TLS client at a plaintext port, a missing or refused client certificate, a server
certificate the given CA does not trust) by one handshake of its own, so the client raises that at
once and does not retry what cannot succeed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from logitcache.client.errors import InvalidArgument

PathLike = str | os.PathLike[str]
PROBE_TIMEOUT_S = 2.0
HINT_TLS = "pass tls=True or ca=PATH (CLI: --tls or --ca PATH; environment: LOGITCACHE_CA)"
HINT_CERT = (
    "pass cert=PATH and key=PATH (CLI: --cert, --key; environment: LOGITCACHE_CERT, LOGITCACHE_KEY)"
)


@dataclass(frozen=True)
class ClientTls:
    """The PEM a TLS channel uses: the CA that signs the server's certificate (None: grpc's
    default roots) and, for mutual TLS, the client's certificate chain and key."""

    ca_path: Path | None = None
    root_certificates: bytes | None = None
    cert_path: Path | None = None
    certificate_chain: bytes | None = None
    key_path: Path | None = None
    private_key: bytes | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def probe_context(self) -> ssl.SSLContext:
        """The same trust and certificate for a handshake of the standard library's own."""
        context = ssl.create_default_context(cafile=self.ca_path)
        if self.cert_path is not None and self.key_path is not None:
            context.load_cert_chain(self.cert_path, self.key_path)
        return context


def client_tls(
    tls: bool | None = None,
    *,
    ca: PathLike | None = None,
    cert: PathLike | None = None,
    key: PathLike | None = None,
    environ: Mapping[str, str] = os.environ,
) -> ClientTls | None:
    """The TLS a client uses (None: plaintext), from its arguments, then the environment."""
    if tls is False:
        if ca is not None or cert is not None or key is not None:
            raise InvalidArgument("tls=False cannot be combined with ca=, cert= or key=")
        return None
    ca = ca if ca is not None else environ.get("LOGITCACHE_CA") or None
    cert = cert if cert is not None else environ.get("LOGITCACHE_CERT") or None
    key = key if key is not None else environ.get("LOGITCACHE_KEY") or None
    wanted = environ.get("LOGITCACHE_TLS", "").lower() in ("1", "true", "yes")
    if tls is None and not (wanted or ca or cert or key):
        return None
    if (cert is None) != (key is None):
        raise InvalidArgument(
            "a client certificate needs both cert= and key= (--cert, --key; LOGITCACHE_CERT, "
            "LOGITCACHE_KEY)"
        )
    ca_path, cert_path, key_path = (Path(p) if p is not None else None for p in (ca, cert, key))
    return ClientTls(
        ca_path=ca_path,
        root_certificates=_read_pem("ca", ca_path),
        cert_path=cert_path,
        certificate_chain=_read_pem("cert", cert_path),
        key_path=key_path,
        private_key=_read_pem("key", key_path),
    )


def open_channel(
    target: str, tls: ClientTls | None, options: list[tuple[str, int]]
) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=options)


async def tls_mismatch(target: str, tls: ClientTls | None, error: grpc.RpcError) -> str | None:
    """Why the server at ``target`` refused the connection that failed with ``error`` (a call on a
    channel that is not connected), when it was the TLS of the two sides that did not match; None
    when it was not, or is not known."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    address = _host_port(target)
    if address is None:
        return None
    host, port = address
    if tls is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context = tls.probe_context()
        except (OSError, ssl.SSLError):
            return None  # grpc accepted what the standard library does not: nothing to say
    outcome = await asyncio.to_thread(_handshake, host, port, context)
    return _explain(target, tls, outcome)


def tls_refusal(message: str) -> grpc.aio.AioRpcError:
    """The UNAVAILABLE the client raises for a TLS mismatch, in place of grpc's "Socket closed"."""
    empty = grpc.aio.Metadata()
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, empty, empty, details=message)


@dataclass(frozen=True)
class _Handshake:
    """What one handshake met."""

    reached: bool = True  # False: no connection at all (the server is down or elsewhere)
    completed: bool = False
    refused: str | None = None  # how the server refused this client (an alert, a close)
    not_tls: bool = False  # the server answered with bytes that are not TLS
    unverified: str | None = None  # why the server's certificate was not trusted


# HTTP/2's client preface and an empty SETTINGS frame, which a gRPC server answers with its own.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes((0, 0, 0, 4, 0, 0, 0, 0, 0))


def _handshake(host: str, port: int, context: ssl.SSLContext) -> _Handshake:
    context.set_alpn_protocols(["h2"])  # a gRPC server closes TLS connections without it
    try:
        raw = socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S)
    except OSError:
        return _Handshake(reached=False)
    completed = False
    try:
        with context.wrap_socket(raw, server_hostname=host) as conn:
            completed = True
            # Under TLS 1.3 a server refuses a client's certificate (or its absence) after the
            # handshake: it closes the connection, where one that accepts answers the preface.
            conn.sendall(H2_PREFACE)
            if not conn.recv(1):
                return _Handshake(completed=True, refused="closed the connection")
    except ssl.SSLCertVerificationError as e:
        return _Handshake(unverified=str(e.verify_message))
    except ssl.SSLEOFError:
        return _Handshake(
            completed=completed, refused="closed the connection" if completed else None
        )
    except ssl.SSLError as e:
        reason = e.reason or type(e).__name__
        if completed or "ALERT" in reason:
            return _Handshake(completed=completed, refused=reason)
        return _Handshake(not_tls=True)
    except TimeoutError:
        pass  # nothing refused within the probe's time: nothing to say
    except OSError:
        return _Handshake(
            completed=completed, refused="reset the connection" if completed else None
        )
    finally:
        raw.close()
    return _Handshake(completed=completed)


def _explain(target: str, tls: ClientTls | None, met: _Handshake) -> str | None:
    if not met.reached:
        return None
    if tls is None:
        if met.completed or met.refused is not None:
            return (
                f"the server at {target} expects TLS and this client connected in plaintext: "
                f"{HINT_TLS}"
            )
        return None
    if met.not_tls:
        return (
            f"the server at {target} does not speak TLS (a plaintext port?): connect without TLS "
            "(tls=False, no --ca/--cert; unset LOGITCACHE_CA and LOGITCACHE_TLS) or to its TLS port"
        )
    if met.unverified is not None and tls.ca_path is not None:
        return (
            f"the certificate of the server at {target} is not trusted with the CA in "
            f"{tls.ca_path} ({met.unverified}): give the CA that signed the server's certificate"
        )
    if met.refused is not None:
        if tls.cert_path is None:
            return f"the server at {target} requires a client certificate (mutual TLS): {HINT_CERT}"
        return (
            f"the server at {target} refused the client certificate in {tls.cert_path} "
            f"({met.refused}): it must be signed by the CA the server trusts (its tls_client_ca)"
        )
    return None


def _host_port(target: str) -> tuple[str, int] | None:
    """Host and port of a grpc target ("host:port", "[v6]:port", "dns:///host:port"); None for
    targets a plain socket cannot reach (unix sockets, other name resolvers)."""
    for scheme in ("dns:///", "ipv4:", "ipv6:"):
        target = target.removeprefix(scheme)
    if target.startswith(("unix:", "unix-abstract:", "vsock:")) or "://" in target:
        return None
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port = rest.removeprefix(":") or "443"
    else:
        host, sep, port = target.rpartition(":")
        if not sep:
            host, port = target, "443"
        elif ":" in host:
            return None  # an IPv6 address without brackets: where its port starts is unclear
    if not host or not port.isdigit():
        return None
    return host, int(port)


def _read_pem(field: str, path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidArgument(f"{field}={str(path)!r} cannot be read: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise InvalidArgument(f"{field}={str(path)!r} is not a PEM file")
    return data
