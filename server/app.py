"""``logitcache serve``: one asyncio process with the gRPC service, the HTTP side and the engines.

Start-up order: store (cleaned of dead writers' leftovers), HTTP side (so /healthz answers and
/readyz says "not yet" while engines load), teachers (started in an executor by the injected
engine factory), gRPC service with health and reflection, then unfinished jobs resume, and the
ready file (if configured) tells a launcher the bound ports. SIGTERM or SIGINT stops accepting
calls, lets running ones finish for a few seconds, seals read-through results, and leaves jobs
to resume on the next start.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from logitcache.client.errors import InvalidArgument, LogitCacheError, NotFound
from logitcache.server.config import ServerConfig
from logitcache.server.engine.protocol import EngineFactory
from logitcache.server.engine.vllm_engine import VLLMEngine
from logitcache.server.grpc.servicer import SERVICE, LogitCacheService
from logitcache.server.http import make_http_app, start_http_side
from logitcache.server.jobs import JobManager
from logitcache.server.leases import leases_for
from logitcache.server.metrics import ServerMetrics
from logitcache.server.policy.admission import Admission, policy_state_dir
from logitcache.server.policy.audit import AuditLog
from logitcache.server.policy.gate import PolicyGate
from logitcache.server.policy.state import PolicyState, SqliteState, open_state
from logitcache.server.policy.tls import add_grpc_port, load_server_tls
from logitcache.server.policy.tokens import RedactTokens
from logitcache.server.readthrough import ReadThroughCache
from logitcache.server.spool import remove_leftover_uploads
from logitcache.server.store.backend import LocalBackend
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.retention import (
    ReadThroughRetention,
    RetentionBudget,
    RetentionPass,
)
from logitcache.server.store.store import Store, open_store
from logitcache.server.store.summary import StoreSummaries
from logitcache.server.streaming import DatasetStreamer
from logitcache.server.teachers.registry import TeacherRegistry

log = logging.getLogger("logitcache.server")
SERVICE_NAME = SERVICE.full_name
GRACE_SECONDS = 5.0


async def serve(
    config: ServerConfig,
    *,
    engine_factory: EngineFactory = VLLMEngine,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int, int], None] | None = None,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT). ``on_ready(grpc_port, http_port)``.

    Teachers' engines come from ``engine_factory`` (vLLM's by default).
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass

    redact_tokens_in_logs()
    tls = load_server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
    store = await loop.run_in_executor(None, _open_clean_store, config)
    gate = await loop.run_in_executor(None, open_gate, config, store)
    # Licences, filters and input roots: one policy for jobs, read-through and SetTeacherLicence.
    admission = Admission.configured(config, policy_state_dir(config, store))
    # Listings, descriptions and totals of the store, kept up to date in a worker thread.
    summaries = StoreSummaries(store, refresh_seconds=config.store_refresh_seconds)
    await summaries.start()
    metrics = ServerMetrics(store_bytes=lambda: summaries.totals.stored_bytes)
    state: dict[str, bool] = {"engine": False, "store": True, "accepting": True}

    probe = StoreProbe(store, writes=bool(config.teachers))

    async def readiness() -> dict[str, bool]:
        # "accepting" turns False once a stop is asked for, so that load balancers and
        # Kubernetes route no new calls to a server that is draining the ones it has.
        return {
            "engine": state["engine"],
            "accepting": state["accepting"],
            "store": await loop.run_in_executor(None, probe),
        }

    http = await start_http_side(
        make_http_app(metrics, readiness),
        config.host,
        config.http_port,
        ssl_context=tls.ssl_context() if tls is not None else None,
    )
    teachers = None
    server = None
    readthrough = jobs = streamer = None
    retention_task: asyncio.Task | None = None
    ready_file = Path(config.ready_file) if config.ready_file else None
    try:
        if not config.teachers:
            log.warning("no teacher configured: store-only server (streaming and listings)")
        teachers = await TeacherRegistry.start(config.teachers, engine_factory)
        state["engine"] = True
        # Segments held in memory, shared by cache hits and streams, least recently used evicted.
        loaded = SegmentCache(config.loaded_segment_bytes)
        metrics.track_segment_cache(loaded)
        retention = read_through_retention(store, config, metrics)
        readthrough = ReadThroughCache(
            store,
            metrics,
            segment_positions=config.segment_positions,
            flush_seconds=config.flush_seconds,
            loaded=loaded,
            max_unsealed_bytes=config.max_unsealed_bytes,
            on_hits=retention.touch if retention is not None else None,
            admission=admission,
        )
        readthrough.start()
        if retention is not None:
            interval = config.readthrough_retention_interval
            retention_task = loop.create_task(retention.run_periodically(interval))
        streamer = DatasetStreamer(store, loaded, prefetch=config.stream_prefetch_batches)
        jobs = JobManager(
            store,
            teachers,
            metrics,
            max_running=config.max_running_jobs,
            max_in_flight=config.job_max_in_flight,
            segment_positions=config.segment_positions,
            leases=leases_for(store, state_url=config.state_url),
            admission=admission,
        )
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", max_request_bytes(config)),
            ]
        )
        service = LogitCacheService(
            config, store, teachers, readthrough, streamer, jobs, metrics, summaries, gate
        )
        service.add_to_server(server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = add_grpc_port(server, f"{config.host}:{config.port}", tls)
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        resumed = await jobs.resume()
        freeze_startup_heap()
        log.info(
            "serving gRPC on %s:%d, HTTP on %s:%d (%d jobs resumed)",
            config.host, port, config.host, http.port, resumed,
        )  # fmt: skip
        if ready_file is not None:
            await loop.run_in_executor(None, write_ready_file, ready_file, port, http.port)
        if on_ready is not None:
            on_ready(port, http.port)
        await stop.wait()
        state["accepting"] = False  # /readyz answers 503 while the calls in flight finish
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        gc.unfreeze()
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)  # the ports are about to close
        if server is not None:
            await server.stop(GRACE_SECONDS)
        if jobs is not None:
            await jobs.close()
        if retention_task is not None:
            retention_task.cancel()
        if readthrough is not None:
            await readthrough.close()
        if streamer is not None:
            streamer.close()
        await http.close()
        await summaries.close()
        await gate.close()  # the audit lines of every call are written
        if teachers is not None:
            teachers.shutdown()


def max_request_bytes(config: ServerConfig) -> int:
    """The largest request message the server reads: what its request limits allow, encoded
    (a token id takes at most 5 bytes, a sequence's framing a few more; a ScoreIds request adds
    as many ids to score as tokens, 5 bytes each, and a count per token, 2), plus room for the
    other fields. gRPC refuses a larger message (RESOURCE_EXHAUSTED) from its length prefix,
    before any of it is held or parsed, so a huge request costs the server no memory and no loop
    time.
    """
    encoded = 12 * config.max_tokens_per_request + 16 * config.max_sequences_per_request
    return min(config.max_message_bytes, encoded + (1 << 16))


class StoreProbe:
    """/readyz's store check. A server that computes must be able to write: ready while the
    store's last write succeeded, checked by a small write at most once a second (so readiness
    recovers when space returns, and turns when the disk fills while nothing else writes). A
    store-only server only needs to read it."""

    INTERVAL_S = 1.0

    def __init__(self, store: Store, *, writes: bool) -> None:
        self.store = store
        self.writes = writes
        self._probed = -math.inf

    def __call__(self) -> bool:
        backend = self.store.backend
        if not self.writes:
            return backend.exists("logitcache-store.json")
        if time.monotonic() - self._probed >= self.INTERVAL_S:
            self._probed = time.monotonic()
            try:
                backend.probe_write()
            except LogitCacheError:
                pass  # recorded in the store's health, read below
        return backend.health.error is None


def freeze_startup_heap() -> None:
    """Keep what start-up allocated (libraries, the engines' objects: they live as long as the
    server) out of the cyclic collector's way. A full collection over that heap holds the GIL for
    hundreds of milliseconds, so a request that allocates much (a large job) would stall the
    loop that long; frozen, a collection walks only what serving allocated. vLLM's own API server
    does the same. Nothing is collected first: that pass would be the very stall avoided, and
    what it could free is start-up's garbage, once."""
    gc.freeze()


def read_through_retention(
    store: Store, config: ServerConfig, metrics: ServerMetrics
) -> ReadThroughRetention | None:
    """The retention of a server that computes (a store-only server deletes nothing), if its
    configuration bounds it; condemned segments are deleted one pass later."""
    interval = config.readthrough_retention_interval  # a segment outlives one pass at least
    budget = RetentionBudget(
        config.readthrough_retention_bytes, config.readthrough_retention_age, min_idle_s=interval
    )
    if not config.teachers or not budget.bounded:
        return None

    def report(p: RetentionPass) -> None:
        metrics.record_retention(p.retained_bytes, p.evicted_segments, p.evicted_bytes)

    return ReadThroughRetention(store, budget, grace_s=interval / 2, on_pass=report)


def open_gate(config: ServerConfig, store: Store) -> PolicyGate:
    """The policy of a server: its state (tokens, access lists, quotas, flags), its audit log,
    default limits and guard policy.

    The state is the replicas' shared database (``state_url``), else SQLite in ``state_dir``
    (default: ``policy/`` in a local store). The audit log is this server's own: ``audit_dir``,
    else ``audit/`` in the state directory (``audit-HOST/`` when replicas share the state, so
    each chain has one writer). An anonymous single-user server on another kind of store, with
    neither, keeps its state in memory and writes no audit log."""
    state_dir = Path(config.state_dir) if config.state_dir else None
    if state_dir is None and isinstance(store.backend, LocalBackend):
        state_dir = store.backend.root / "policy"
    if config.state_url:
        state: PolicyState = open_state(config.state_url)
    elif state_dir is not None:
        state = open_state(state_dir)
    elif config.allow_anonymous:
        log.warning("no --state-dir: access lists and usage are kept in memory, no audit log")
        state = SqliteState(":memory:")
    else:
        raise InvalidArgument(
            f"store {store.url} is not a local directory: give --state-dir (or --state-url) for "
            "the policy state (tokens, access lists, quotas)"
        )
    audit_dir = Path(config.audit_dir) if config.audit_dir else None
    if audit_dir is None and state_dir is not None:
        shared = f"audit-{socket.gethostname()}" if config.state_url else "audit"
        audit_dir = state_dir / shared
    audit = None
    if audit_dir is not None:
        audit = AuditLog(
            audit_dir,
            max_bytes=config.audit_max_bytes,
            retention_days=config.audit_retention_days or None,
        )
    return PolicyGate(
        state,
        allow_anonymous=config.allow_anonymous,
        defaults=config.default_limits(),
        guard=config.guard_policy(),
        dataset_positions=functools.partial(dataset_positions, store),
        audit=audit,
        replica=socket.gethostname() if config.state_url else "local",
    )


def dataset_positions(store: Store, names: list[str]) -> int:
    """The positions of the datasets of ``names`` that exist (from their manifests alone)."""
    total = 0
    for name in names:
        try:
            total += int(store.backend.read_json(f"datasets/{name}/dataset.json")["positions"])
        except NotFound:
            continue  # deleted since its access list was written
    return total


def redact_tokens_in_logs() -> None:
    """Tokens never reach the server's log: every handler of the root logger redacts them."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactTokens) for f in handler.filters):
            handler.addFilter(RedactTokens())


def _open_clean_store(config: ServerConfig) -> Store:
    """The store, without what dead writers left half-done: unsealed segments and datasets
    whose writer is provably gone, and job uploads of submissions that never finished."""
    store = open_store(config.store, writable=True, s3=config.s3_settings())
    removed = store.clean_unsealed()
    if removed:
        log.info("removed %d unsealed segments and datasets left by dead writers", removed)
    uploads = remove_leftover_uploads(store.backend)
    if uploads:
        log.info("removed %d job uploads left by unfinished submissions", uploads)
    return store


def write_ready_file(path: Path, grpc_port: int, http_port: int) -> None:
    """``{"grpc_port", "http_port", "pid"}`` at ``path``, atomically: a reader sees all or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"grpc_port": grpc_port, "http_port": http_port, "pid": os.getpid()}))
    os.replace(tmp, path)
