"""`logitcache serve` on the transformers reference engine, as a real child process.

Run as a script, it takes serve's own flags (the CLI's parser) and serves them with the
reference engine factory, which starts in a second instead of vLLM's half a minute and needs no
engine process. :class:`ReferenceServer` starts it on ports the OS picks and waits for its ready
file. Importable from tests in this folder (pytest puts a test file's folder on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE_K = 8


class ReferenceServer:
    """A server process on loopback; ``pid`` is the process that serves (no engine child)."""

    def __init__(
        self,
        teacher: Path,
        store: Path,
        *extra: str,
        log_path: Path | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.store = store
        self.log_path = log_path or store.parent / f"{store.name}-reference-serve.log"
        self._log = open(self.log_path, "ab")
        self._log_start = self._log.tell()
        self._ready_dir = tempfile.TemporaryDirectory(prefix="logitcache-ready-")
        ready_file = Path(self._ready_dir.name) / "ready.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-P", __file__, "--teacher", f"demo={teacher}",
             "--max-top-k", str(REFERENCE_K), "--default-top-k", str(REFERENCE_K),
             "--store", str(store), "--port", "0", "--http-port", "0",
             "--ready-file", str(ready_file), *extra],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        while not ready_file.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        ready = json.loads(ready_file.read_text())
        self.target = f"127.0.0.1:{ready['grpc_port']}"
        self.http_url = f"http://127.0.0.1:{ready['http_port']}"

    def log_tail(self, chars: int = 6000) -> str:
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

    def __enter__(self) -> ReferenceServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _main(argv: list[str]) -> int:
    import asyncio
    import logging

    from logitcache.cli import build_parser
    from logitcache.server.app import serve
    from logitcache.server.config import FIELD_HELP, load_config, teachers_from_flags
    from logitcache.server.engine.reference import ReferenceEngine

    args = build_parser().parse_args(["serve", *argv])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides: dict = {name: getattr(args, name) for name in FIELD_HELP}
    overrides["teachers"] = teachers_from_flags(args.teacher, vars(args))
    asyncio.run(serve(load_config(args.config, overrides), engine_factory=ReferenceEngine))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
