"""`logitcache serve` on the transformers reference engine, as a real child process.

Run as a script, it takes serve's own flags (the CLI's parser) and serves them with the
reference engine factory, which starts in a second instead of vLLM's half a minute and needs no
engine process. :class:`ReferenceServer` starts it on ports the OS picks and waits for its ready
file. Importable from tests in this folder (pytest puts a test file's folder on ``sys.path``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from logitcache.server.launcher import ServerProcess

REFERENCE_K = 8


class ReferenceServer(ServerProcess):
    """A server process on loopback; ``pid`` is the process that serves (no engine child)."""

    def __init__(
        self,
        teacher: Path,
        store: Path | str,
        *extra: str,
        log_path: Path | None = None,
        timeout: float = 120.0,
        allow_anonymous: bool = True,
    ) -> None:
        super().__init__(
            teacher,
            store,
            "--max-top-k", str(REFERENCE_K), "--default-top-k", str(REFERENCE_K), *extra,
            log_path=log_path or Path(store).parent / f"{Path(store).name}-reference-serve.log",
            timeout=timeout,
            command=(sys.executable, "-P", __file__),
            allow_anonymous=allow_anonymous,
        )  # fmt: skip


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
