"""/readyz turns 503 as soon as a server is asked to stop, while it drains the calls it has:
the Kubernetes readiness probe and any load balancer then route no new calls to it."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import grpc

from logitcache.bench.synthetic import synthetic_store
from logitcache.server.app import serve
from logitcache.server.config import ServerConfig
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc


def readyz(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_readyz_is_503_while_the_server_drains(tmp_path: Path) -> None:
    # Enough records that an unread stream stays in flight: gRPC's flow control holds it.
    store = synthetic_store(tmp_path / "store", 200_000, 256, 8)
    config = ServerConfig(store=store, port=0, http_port=0, allow_anonymous=True)

    async def scenario() -> tuple[int, tuple[int, dict], bool]:
        stop, ports = asyncio.Event(), asyncio.get_running_loop().create_future()
        server = asyncio.create_task(
            serve(config, stop=stop, on_ready=lambda g, h: ports.set_result((g, h)))
        )
        grpc_port, http_port = await asyncio.wait_for(ports, 120)
        url = f"http://127.0.0.1:{http_port}/readyz"
        before, _ = await asyncio.to_thread(readyz, url)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stream = pb_grpc.LogitCacheStub(channel).StreamDataset(
                pb.StreamDatasetRequest(dataset="bench", batch_records=1)
            )
            await stream.read()  # the stream is open, and left unread
            stop.set()
            draining = await asyncio.to_thread(readyz, url)
            in_flight = not server.done()
            stream.cancel()
        await server
        return before, draining, in_flight

    before, (status, body), in_flight = asyncio.run(scenario())
    assert before == 200
    assert in_flight  # the answer came while the server was still draining
    assert status == 503 and body["checks"]["accepting"] is False
