"""``logitcache serve``: one asyncio process with the gRPC service, the HTTP side and the engines.

Start-up order: store (cleaned of dead writers' leftovers), HTTP side (so /healthz answers and
/readyz says "not yet" while engines load), teachers, gRPC service with health and reflection,
then unfinished jobs resume. SIGTERM or SIGINT stops accepting calls, lets running ones finish
for a few seconds, seals read-through results, and leaves jobs to resume on the next start.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from logitcache.server.config import ServerConfig
from logitcache.server.grpc.servicer import LogitCacheService
from logitcache.server.http import make_http_app, start_http_side
from logitcache.server.jobs import JobManager
from logitcache.server.metrics import ServerMetrics
from logitcache.server.readthrough import ReadThroughCache
from logitcache.server.store.store import open_store
from logitcache.server.streaming import DatasetStreamer, LoadedSegments
from logitcache.server.teachers.registry import TeacherRegistry
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

log = logging.getLogger("logitcache.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LogitCache"].full_name
GRACE_SECONDS = 5.0


async def serve(
    config: ServerConfig,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int, int], None] | None = None,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT). ``on_ready(grpc_port, http_port)``."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass

    store = open_store(config.store, writable=True)
    removed = store.clean_unsealed()
    if removed:
        log.info("removed %d unsealed segments left by dead writers", removed)
    metrics = ServerMetrics(store_bytes=store.storage.disk_usage)
    state: dict[str, bool] = {"engine": False, "store": True}

    async def readiness() -> dict[str, bool]:
        return {"engine": state["engine"], "store": store.storage.path("").is_dir()}

    http = await start_http_side(make_http_app(metrics, readiness), config.host, config.http_port)
    teachers = None
    server = None
    readthrough = jobs = streamer = None
    try:
        if not config.teachers:
            log.warning("no teacher configured: store-only server (streaming and listings)")
        teachers = TeacherRegistry.start(config.teachers)
        state["engine"] = True
        # Segments held in memory, shared by cache hits and streams, least recently used evicted.
        loaded = LoadedSegments(config.loaded_segment_bytes)
        readthrough = ReadThroughCache(
            store,
            metrics,
            segment_positions=config.segment_positions,
            flush_seconds=config.flush_seconds,
            loaded=loaded,
        )
        readthrough.start()
        streamer = DatasetStreamer(store, loaded, prefetch=config.stream_prefetch_batches)
        jobs = JobManager(
            store,
            teachers,
            metrics,
            max_running=config.max_running_jobs,
            max_in_flight=config.job_max_in_flight,
            segment_positions=config.segment_positions,
        )
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_message_bytes),
            ]
        )
        service = LogitCacheService(config, store, teachers, readthrough, streamer, jobs, metrics)
        pb_grpc.add_LogitCacheServicer_to_server(service, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = server.add_insecure_port(f"{config.host}:{config.port}")
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        resumed = jobs.resume()
        log.info(
            "serving gRPC on %s:%d, HTTP on %s:%d (%d jobs resumed)",
            config.host, port, config.host, http.port, resumed,
        )  # fmt: skip
        if on_ready is not None:
            on_ready(port, http.port)
        await stop.wait()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        if server is not None:
            await server.stop(GRACE_SECONDS)
        if jobs is not None:
            await jobs.close()
        if readthrough is not None:
            await readthrough.close()
        if streamer is not None:
            streamer.close()
        await http.close()
        if teachers is not None:
            teachers.shutdown()
