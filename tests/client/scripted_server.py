"""A gRPC server of the logitcache contract with scripted answers, for the client's own tests.

``python -P scripted_server.py PORT_FILE`` serves on a loopback port that it writes to PORT_FILE.
It runs in its own process, so that the tests' process holds no grpc server across a fork. What
it does (the names are the script):

- ``DescribeDataset("ds")``: 40 sequences; ``"open-streams"``: as ``sequences``, the number of
  server streams open right now (how a test sees that the client let go of one); ``"slow"``:
  answers after 0.2 s; any other name: NOT_FOUND.
- ``StreamDataset("ds")``: 40 records of 3 positions, in batches of ``batch_records``, from
  ``start_cursor``; ``"endless"``: batches without end.
- ``GetDistributions``: for each request, one record per sequence, with ids derived from the
  sequence's own tokens.
- ``WatchJob("done")``: running, then completed; ``"failed"``: failed; ``"endless"``: running,
  every 20 ms, without end.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import numpy as np

from logitcache.client.codecs import TopKCodec, TopKRows
from logitcache.client.space import CaptureSpace, record_key
from logitcache.client.wire import encode_batch
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

VOCAB, K, LENGTH, RECORDS = 100, 4, 3, 40
SPACE = CaptureSpace("teacher", "tokenizer", VOCAB, "topk", K, "float32", TopKCodec.name)
_LOGPROBS = np.log(np.array([0.5, 0.2, 0.1, 0.05], dtype=np.float32))


def record_batch(sequences: Sequence[np.ndarray], cursor: int = 0) -> pb.RecordBatch:
    """The records of ``sequences``: row t lists ids x[t], x[t] + 1, ... with fixed log-probs."""
    ids = np.concatenate(sequences).astype(np.int64)
    targets = np.full(ids.shape, np.log(0.5), dtype=np.float32)
    targets[np.cumsum([len(s) for s in sequences]) - 1] = np.nan
    rows = TopKRows(
        token_ids=((ids[:, None] + np.arange(K)) % VOCAB).astype(np.int32),
        logprobs=np.broadcast_to(_LOGPROBS, (len(ids), K)).copy(),
        target_logprobs=targets,
    )
    arrays = TopKCodec(VOCAB).encode(rows)
    keys = [record_key(SPACE.space_id, s) for s in sequences]
    return encode_batch(SPACE, keys, ids, np.array([len(s) for s in sequences]), arrays,
                        cursor=cursor)  # fmt: skip


def sequence(index: int) -> np.ndarray:
    return (np.arange(LENGTH) + 7 * index) % VOCAB


class ScriptedService(pb_grpc.LogitCacheServicer):
    def __init__(self) -> None:
        self.open_streams = 0

    async def DescribeDataset(self, request, context):  # noqa: N802 (the contract's names)
        if request.dataset == "ds":
            return pb.DatasetInfo(name="ds", state="complete", sequences=RECORDS)
        if request.dataset == "open-streams":
            return pb.DatasetInfo(name="open-streams", sequences=self.open_streams)
        if request.dataset == "slow":
            await asyncio.sleep(0.2)
            return pb.DatasetInfo(name="slow", sequences=1)
        await context.abort(grpc.StatusCode.NOT_FOUND, f"dataset {request.dataset!r} not found")

    async def StreamDataset(self, request, context) -> AsyncIterator[pb.RecordBatch]:  # noqa: N802
        self.open_streams += 1
        try:
            size = request.batch_records or 4
            cursor = request.start_cursor
            while request.dataset == "endless" or cursor < RECORDS:
                count = size if request.dataset == "endless" else min(size, RECORDS - cursor)
                batch = [sequence(i) for i in range(cursor, cursor + count)]
                cursor += count
                yield record_batch(batch, cursor)
                await asyncio.sleep(0)
        finally:
            self.open_streams -= 1

    async def GetDistributions(self, request_iterator, context):  # noqa: N802
        async for request in request_iterator:
            sequences = [np.asarray(s.input_ids, dtype=np.int64) for s in request.sequences]
            yield pb.DistributionsResponse(records=record_batch(sequences))

    async def WatchJob(self, request, context) -> AsyncIterator[pb.Job]:  # noqa: N802
        self.open_streams += 1
        try:
            if request.id == "failed":
                yield pb.Job(id="failed", state="failed", error="the engine fell over")
                return
            yield pb.Job(id=request.id, state="running")
            while request.id == "endless":
                await asyncio.sleep(0.02)
                yield pb.Job(id=request.id, state="running")
            yield pb.Job(id=request.id, state="completed")
        finally:
            self.open_streams -= 1


async def serve(port_file: Path) -> None:
    server = grpc.aio.server()
    pb_grpc.add_LogitCacheServicer_to_server(ScriptedService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1])))
