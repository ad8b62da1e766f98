"""The server's HTTP side: liveness, readiness and Prometheus metrics on a port of their own.

It runs on the same asyncio loop as the gRPC server, so probes and scrapes see the live state
without threads. Kubernetes-style semantics:
    GET /healthz  200 while the process serves at all (liveness: restart when this fails)
    GET /readyz   200 when every readiness check passes, else 503 (stop routing traffic)
    GET /metrics  the Prometheus exposition text
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from logitcache.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

Readiness = Callable[[], Awaitable[dict[str, bool]]]


def make_http_app(metrics: ServerMetrics, readiness: Readiness) -> web.Application:
    """The routes; `readiness` returns named checks, e.g. {"engine": True, "store": True}."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        try:
            checks = {name: bool(passed) for name, passed in (await readiness()).items()}
        except Exception as exc:  # a check that cannot run is a check that fails
            log.warning("readiness check raised", exc_info=True)
            error = f"{type(exc).__name__}: {exc}"
            return web.json_response({"ready": False, "checks": {}, "error": error}, status=503)
        ready = all(checks.values())
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def metrics_text(_: web.Request) -> web.Response:
        body, content_type = metrics.render()
        # Set as a header: aiohttp's content_type argument refuses the charset parameter.
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)
    return app


@dataclass(frozen=True)
class HttpSide:
    """A started HTTP side: its runner and the port it is bound to (useful after port 0)."""

    runner: web.AppRunner
    port: int

    async def close(self) -> None:
        """Stop listening and finish in-flight requests."""
        await self.runner.cleanup()


async def start_http_side(
    app: web.Application, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None
) -> HttpSide:
    """Serve `app` on host:port from the running loop; port 0 picks a free port; HTTPS with
    `ssl_context`.

    When `host` resolves to several addresses, `HttpSide.port` is the first socket's port.
    """
    # No access log: probes and scrapes every few seconds would drown the server's own log.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    return HttpSide(runner=runner, port=bound_port)
