"""Start `logitcache serve` as a child process and wait until it serves (tests, benchmarks, demo)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

_READY = re.compile(rb"serving gRPC on [^:]+:(\d+), HTTP on [^:]+:(\d+)")


class ServerProcess:
    """A real `logitcache serve` process on loopback, on ports the OS picks.

    ``teacher=None`` starts a store-only server. Its log goes to ``log_path`` (default: next to
    the store). ``kill()`` is kill -9 of the server and its engine processes; ``stop()`` is the
    SIGTERM an orchestrator sends.
    """

    def __init__(
        self,
        teacher: Path | str | None,
        store: Path,
        *extra: str,
        log_path: Path | None = None,
        timeout: float = 300.0,
    ) -> None:
        self.store = store
        self.log_path = log_path or store.parent / f"{store.name}-serve.log"
        self._log = open(self.log_path, "ab")
        offset = self._log.tell()  # a restart on the same store appends to the same log
        teacher_args = ["--teacher", f"demo={teacher}"] if teacher is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "logitcache.cli", "serve", *teacher_args,
             "--store", str(store), "--port", "0", "--http-port", "0", *extra],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _READY.search(self.log_path.read_bytes()[offset:])
            if match:
                self.port, self.http_port = int(match.group(1)), int(match.group(2))
                break
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"server exited early:\n{self.log_tail()}")
            time.sleep(0.2)
        else:
            self.kill()
            raise RuntimeError(f"server did not start in {timeout:.0f} s:\n{self.log_tail()}")
        self.target = f"127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
