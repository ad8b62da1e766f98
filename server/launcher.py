"""Start `logitcache serve` as a child process and wait until it serves (tests, benchmarks, demo).

The server is told to write a ready file (``--ready-file``) once it serves; its ports (picked by
the OS) come from that file, never from the log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


class ServerProcess:
    """A real `logitcache serve` process on loopback, on ports the OS picks.

    ``teacher=None`` starts a store-only server. ``store`` is a directory or a store URL
    (``s3://...``). Its log goes to ``log_path`` (default: next to a store directory). With ``--tls-cert`` among the flags in ``extra``, ``http_url`` is https.
    ``kill()`` is kill -9 of the server and its engine processes; ``stop()`` is the SIGTERM an
    orchestrator sends. ``command`` replaces ``python -m logitcache.cli serve`` (tests serve
    the same flags with another engine factory). ``allow_anonymous`` (the default) serves
    callers without a token as the one local user (``--allow-anonymous``: the bind is
    loopback); False needs tokens (``logitcache tokens create --state DIR``).
    """

    def __init__(
        self,
        teacher: Path | str | None,
        store: Path | str,
        *extra: str,
        log_path: Path | None = None,
        timeout: float = 300.0,
        command: Sequence[str] = (sys.executable, "-P", "-m", "logitcache.cli", "serve"),
        allow_anonymous: bool = True,
    ) -> None:
        self.store = store
        if log_path is None:
            if not isinstance(store, Path):
                raise ValueError(f"a server on the store URL {store} needs a log_path")
            log_path = store.parent / f"{store.name}-serve.log"
        self.log_path = log_path
        self._log = open(self.log_path, "ab")
        self._log_start = self._log.tell()  # a restart on the same store appends to the same log
        self._ready_dir = tempfile.TemporaryDirectory(prefix="logitcache-ready-")
        ready_file = Path(self._ready_dir.name) / "ready.json"
        teacher_args = ["--teacher", f"demo={teacher}"] if teacher is not None else []
        self.proc = subprocess.Popen(
            [*command, *teacher_args,
             "--store", str(store), "--port", "0", "--http-port", "0",
             "--ready-file", str(ready_file),
             *(["--allow-anonymous"] if allow_anonymous else []), *extra],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.pid = self.proc.pid
        try:
            ready = self._wait_ready(ready_file, timeout)
        except BaseException:
            self.kill()
            raise
        self.port, self.http_port = int(ready["grpc_port"]), int(ready["http_port"])
        self.target = f"127.0.0.1:{self.port}"
        tls = any(a == "--tls-cert" or a.startswith("--tls-cert=") for a in extra)
        self.http_url = f"{'https' if tls else 'http'}://127.0.0.1:{self.http_port}"

    def _wait_ready(self, ready_file: Path, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready_file.is_file():  # written atomically: complete once it exists
                ready: dict[str, int] = json.loads(ready_file.read_text())
                if ready.get("pid") == self.pid:
                    return ready
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.proc.returncode} before it was ready:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready in {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        """The end of this process's part of the log."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")[-chars:]

    def memory_kib(self, field: str = "VmRSS") -> int:
        """A memory figure of the server process from /proc (VmRSS now, VmHWM its peak)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise KeyError(field)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._close()

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._close()

    def _close(self) -> None:
        self._log.close()
        self._ready_dir.cleanup()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
