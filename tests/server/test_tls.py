"""TLS and mutual TLS through real `logitcache serve` processes on loopback (store-only servers),
with certificates made at test time: what connects, what is refused and what the refusal says."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from logitcache.client.client import Client
from logitcache.client.errors import InvalidArgument
from logitcache.client.tls import client_tls
from logitcache.server.launcher import ServerProcess
from logitcache.server.policy.tls import load_server_tls

RPC_S = 30.0


@dataclass(frozen=True)
class Pki:
    """PEM files of a lab's CA, the server's certificate and key, a client's, and a client
    certificate of some other CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_ca: Path
    stranger_cert: Path
    stranger_key: Path


def _write_leaf(leaf: trustme.LeafCert, cert: Path, key: Path) -> None:
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    lab, other = trustme.CA(), trustme.CA()
    pki = Pki(*(d / name for name in (
        "ca.pem", "server.pem", "server.key", "client.pem", "client.key",
        "stranger-ca.pem", "stranger.pem", "stranger.key",
    )))  # fmt: skip
    lab.cert_pem.write_to_path(str(pki.ca))
    other.cert_pem.write_to_path(str(pki.stranger_ca))
    _write_leaf(lab.issue_cert("localhost", "127.0.0.1"), pki.server_cert, pki.server_key)
    _write_leaf(lab.issue_cert("trainer@lab.example"), pki.client_cert, pki.client_key)
    _write_leaf(other.issue_cert("trainer@elsewhere.example"), pki.stranger_cert, pki.stranger_key)
    return pki


def _server(tmp_path_factory: pytest.TempPathFactory, name: str, *flags: str) -> ServerProcess:
    return ServerProcess(None, tmp_path_factory.mktemp(name) / "store", *flags, timeout=120)


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory):
    flags = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    with _server(tmp_path_factory, "tls", *flags) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory):
    flags = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
             "--tls-client-ca", str(pki.ca))  # fmt: skip
    with _server(tmp_path_factory, "mtls", *flags) as server:
        yield server


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory):
    with _server(tmp_path_factory, "plain") as server:
        yield server


@pytest.fixture(autouse=True)
def no_tls_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests say what they connect with; the runner's environment does not."""
    for name in ("LOGITCACHE_CA", "LOGITCACHE_CERT", "LOGITCACHE_KEY", "LOGITCACHE_TLS"):
        monkeypatch.delenv(name, raising=False)


def _refusal(target: str, **tls: Any) -> grpc.RpcError:
    """The error of a call from a client with ``tls`` arguments, which must fail."""
    with Client(target, timeout=RPC_S, **tls) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.list_datasets()
    return caught.value


# ---- connections that succeed ---------------------------------------------------------------


def test_tls_client_trusting_the_lab_ca_is_served(tls_server, pki):
    with Client(tls_server.target, ca=pki.ca, timeout=RPC_S) as client:
        assert client.list_datasets() == []
        assert client.list_teachers().teachers == []  # store-only


def test_the_ca_can_come_from_the_environment(tls_server, pki, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_CA", str(pki.ca))
    with Client(tls_server.target, timeout=RPC_S) as client:
        assert client.list_datasets() == []


def test_mutual_tls_client_with_its_certificate_is_served(mtls_server, pki):
    with Client(
        mtls_server.target, ca=pki.ca, cert=pki.client_cert, key=pki.client_key, timeout=RPC_S
    ) as client:
        assert client.list_datasets() == []


# ---- connections that are refused, and what the refusal says --------------------------------


def test_plaintext_client_at_a_tls_port_is_told_the_server_expects_tls(tls_server, mtls_server):
    for server in (tls_server, mtls_server):
        error = _refusal(server.target, tls=False)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "expects TLS" in error.details() and "--ca" in error.details()


def test_a_stream_that_cannot_connect_says_why_too(tls_server):
    with Client(tls_server.target, tls=False, timeout=RPC_S) as client:
        with pytest.raises(grpc.RpcError) as caught:
            list(client.watch_job("feedfacefeedface"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "expects TLS" in caught.value.details()


def test_mutual_tls_without_a_client_certificate_is_refused(mtls_server, pki):
    error = _refusal(mtls_server.target, ca=pki.ca)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "requires a client certificate" in error.details()


def test_mutual_tls_with_a_certificate_of_another_ca_is_refused(mtls_server, pki):
    error = _refusal(mtls_server.target, ca=pki.ca, cert=pki.stranger_cert, key=pki.stranger_key)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "refused the client certificate" in error.details()
    assert str(pki.stranger_cert) in error.details()


def test_a_ca_that_did_not_sign_the_server_certificate_is_refused(tls_server, pki):
    error = _refusal(tls_server.target, ca=pki.stranger_ca)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "not trusted with the CA" in error.details()


def test_tls_client_at_a_plaintext_port_is_told_it_does_not_speak_tls(plain_server, pki):
    error = _refusal(plain_server.target, ca=pki.ca)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "does not speak TLS" in error.details()


def test_plaintext_client_at_a_plaintext_port_is_served(plain_server):
    with Client(plain_server.target, timeout=RPC_S) as client:
        assert client.list_datasets() == []


# ---- the HTTP side ---------------------------------------------------------------------------


def test_https_healthz_with_the_ca_and_not_without(tls_server, mtls_server, pki):
    assert tls_server.http_url.startswith("https://")
    trusting = ssl.create_default_context(cafile=pki.ca)
    for server in (tls_server, mtls_server):  # probes present no client certificate
        with urllib.request.urlopen(f"{server.http_url}/healthz", context=trusting) as r:
            assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
    with pytest.raises(urllib.error.URLError) as caught:
        urllib.request.urlopen(
            f"{tls_server.http_url}/healthz", context=ssl.create_default_context()
        )
    assert isinstance(caught.value.reason, ssl.SSLCertVerificationError)
    with pytest.raises(OSError):  # plain HTTP at the HTTPS port: the server hangs up
        urllib.request.urlopen(tls_server.http_url.replace("https:", "http:") + "/healthz")


# ---- renewed certificates ------------------------------------------------------------------


def _replace(path: Path, data: bytes) -> None:
    """Replace a file the way renewal tools do: a new file renamed over the old."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _eventually(check: Callable[[], bool], seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def _served_with(server: ServerProcess, ca: Path) -> bool:
    with Client(server.target, ca=ca, timeout=RPC_S, retries=0) as client:
        try:
            client.list_datasets()
        except grpc.RpcError:
            return False
    return True


def _https_with(server: ServerProcess, ca: Path) -> bool:
    context = ssl.create_default_context(cafile=ca)
    try:
        with urllib.request.urlopen(f"{server.http_url}/healthz", context=context) as r:
            return r.status == 200
    except urllib.error.URLError:
        return False


def test_renewed_certificates_are_served_without_a_restart(pki, tmp_path):
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    _replace(cert, pki.server_cert.read_bytes())
    _replace(key, pki.server_key.read_bytes())
    flags = ("--tls-cert", str(cert), "--tls-key", str(key))
    with ServerProcess(None, tmp_path / "store", *flags, timeout=120) as server:
        assert _served_with(server, pki.ca) and _https_with(server, pki.ca)

        # A half-done renewal (a key that is not the certificate's) is logged; the old pair serves.
        _replace(key, pki.client_key.read_bytes())
        assert _eventually(
            lambda: _https_with(server, pki.ca) and "do not check out" in server.log_tail()
        ), server.log_tail()
        assert _served_with(server, pki.ca)

        renewed = trustme.CA()
        renewed_ca = tmp_path / "renewed-ca.pem"
        renewed.cert_pem.write_to_path(str(renewed_ca))
        leaf = renewed.issue_cert("localhost", "127.0.0.1")
        _replace(key, leaf.private_key_pem.bytes())
        _replace(cert, b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        assert _eventually(lambda: _served_with(server, renewed_ca)), server.log_tail()
        assert _eventually(lambda: _https_with(server, renewed_ca)), server.log_tail()
        assert "not trusted with the CA" in _refusal(server.target, ca=pki.ca).details()
        assert not _https_with(server, pki.ca)


# ---- the CLI's client flags -----------------------------------------------------------------


def _jobs(target: str, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGITCACHE_")}
    return subprocess.run(
        [sys.executable, "-P", "-m", "logitcache.cli", "jobs", "--server", target, *flags],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_cli_client_flags_connect_with_mutual_tls(mtls_server, pki):
    tls = ("--ca", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key))
    served = _jobs(mtls_server.target, *tls)
    assert served.returncode == 0, served.stderr
    refused = _jobs(mtls_server.target, "--ca", str(pki.ca))
    assert refused.returncode == 2
    assert "requires a client certificate" in refused.stderr and "--cert" in refused.stderr


# ---- configuration errors, found before anything is served ----------------------------------


def test_server_tls_configuration_errors_name_the_file_never_its_content(pki, tmp_path):
    assert load_server_tls("", "") is None
    with pytest.raises(InvalidArgument, match="both tls_cert and tls_key"):
        load_server_tls(str(pki.server_cert), "")
    with pytest.raises(InvalidArgument, match="both tls_cert and tls_key"):
        load_server_tls("", "", str(pki.ca))
    with pytest.raises(InvalidArgument, match="cannot be read"):
        load_server_tls(str(tmp_path / "missing.pem"), str(pki.server_key))
    secret = tmp_path / "secret.txt"
    secret.write_text("api_key=sk-live-0123456789abcdef\n")
    with pytest.raises(InvalidArgument, match="not a PEM file") as caught:
        load_server_tls(str(pki.server_cert), str(secret))
    assert "sk-live" not in str(caught.value)
    with pytest.raises(InvalidArgument, match="do not make a usable certificate") as caught:
        load_server_tls(str(pki.server_cert), str(pki.client_key))  # another certificate's key
    assert "PRIVATE KEY" not in str(caught.value)
    tls = load_server_tls(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    assert tls is not None and tls.current().client_ca == pki.ca.read_bytes()


def test_server_with_a_mismatched_key_exits_before_serving(pki, tmp_path):
    flags = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key))
    with pytest.raises(RuntimeError, match="before it was ready") as caught:
        ServerProcess(None, tmp_path / "store", *flags, timeout=120)
    assert "do not make a usable certificate" in str(caught.value)


def test_client_tls_arguments_and_environment(pki):
    environ = {"LOGITCACHE_CA": str(pki.ca)}
    assert client_tls(environ={}) is None
    assert client_tls(tls=False, environ=environ) is None  # plaintext whatever the environment
    from_env = client_tls(environ=environ)
    assert from_env is not None and from_env.root_certificates == pki.ca.read_bytes()
    default_roots = client_tls(environ={"LOGITCACHE_TLS": "1"})
    assert default_roots is not None and default_roots.root_certificates is None
    with pytest.raises(InvalidArgument, match="cannot be combined"):
        client_tls(tls=False, ca=pki.ca, environ={})
    with pytest.raises(InvalidArgument, match="both cert= and key="):
        client_tls(cert=pki.client_cert, environ={})
    with pytest.raises(InvalidArgument, match="is not a PEM file"):
        client_tls(ca=__file__, environ={})  # a Python file is no CA
