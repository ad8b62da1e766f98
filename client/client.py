"""Clients of the logitcache gRPC service: :class:`Client` (blocking) and :class:`AsyncClient`.

Both speak the wire contract in ``proto/logitcache/v1/logitcache.proto`` and return
:class:`~logitcache.client.record.Record` objects. What they share lives in this module as plain
functions and small classes: request builders, decoders, the retry policy (:class:`_Backoff`), the
pipelined read-through stream (:class:`_Pipeline`), the dataset-stream cursor
(:class:`_CursorBuffer`) and the job progress bar. The two classes are only the thin call layer on top.

Failure handling:

- Server errors surface as ``grpc.RpcError`` with the server's status code and message.
- UNAVAILABLE (server starting, restarting or unreachable) is retried with exponential backoff and
  jitter, at most ``retries`` times in a row: unary calls are simply repeated; streams are
  reopened where they broke. ``stream_dataset`` resumes from the cursor of the last batch it
  received, ``get_distributions_iter`` sends the requests that were not answered yet again (the
  read-through cache makes that idempotent), and ``watch_job`` starts watching again. Any other
  status code is raised at once.
- Unary calls, ``get_distributions`` and ``precompute`` carry a deadline of ``timeout`` seconds
  per attempt; the long-lived streams (``stream_dataset``, ``get_distributions_iter``,
  ``watch_job``) have none.
"""

from __future__ import annotations

import asyncio
import queue
import random
import sys
import time
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from typing import Any, TypeVar

import grpc
import numpy as np

from logitcache.client.record import Record
from logitcache.client.wire import decode_batch
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "AsyncDatasetStream", "Client", "DatasetStream"]

T = TypeVar("T")
ENDED = ("completed", "failed", "cancelled")
_END = object()  # end of the caller's batches

# ---- retry policy ---------------------------------------------------------------------------


class _Backoff:
    """Exponential backoff with jitter for UNAVAILABLE: the one retry policy of both clients.

    Attempt ``n`` (0-based) waits ``min(max_delay, base * 2**n)`` scaled by a random factor in
    [0.5, 1), so that many clients of a restarting server do not come back in lockstep.
    """

    def __init__(self, retries: int, base: float = 0.5, max_delay: float = 15.0) -> None:
        self.retries = retries
        self.base = base
        self.max_delay = max_delay

    def delay(self, error: BaseException, attempt: int) -> float | None:
        """Seconds to wait before retrying after ``error``, or None: give up and raise it."""
        if attempt >= self.retries or not _is_unavailable(error):
            return None
        return min(self.max_delay, self.base * 2**attempt) * random.uniform(0.5, 1.0)


def _is_unavailable(error: BaseException) -> bool:
    return isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Reconnect to a restarted server within seconds, not grpc's default of up to 2 minutes.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]


# ---- request builders and decoders ----------------------------------------------------------


def _sequence(ids: Any, index: int) -> pb.Sequence:
    a = np.asarray(ids)
    if a.ndim != 1 or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"sequence {index}: expected a 1-D list or array of integer token ids")
    if a.size and a.min() < 0:
        raise ValueError(f"sequence {index}: negative token id {int(a.min())}")
    return pb.Sequence(input_ids=a.tolist())


def _distributions_request(
    sequences: Iterable[Any], teacher: str | None, top_k: int | None
) -> pb.DistributionsRequest:
    return pb.DistributionsRequest(
        teacher=teacher or "",
        top_k=top_k or 0,
        sequences=[_sequence(s, i) for i, s in enumerate(sequences)],
    )


def _records(response: pb.DistributionsResponse, request: pb.DistributionsRequest) -> list[Record]:
    records = decode_batch(response.records)
    if len(records) != len(request.sequences):
        raise ValueError(
            f"server answered {len(records)} records for {len(request.sequences)} sequences"
        )
    return records


def _stream_request(
    dataset: str,
    *,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    start_cursor: int,
    batch_records: int,
    allow_partial: bool,
    shuffle: bool,
) -> pb.StreamDatasetRequest:
    return pb.StreamDatasetRequest(
        dataset=dataset,
        rank=rank,
        world_size=world_size,
        seed=seed,
        epoch=epoch,
        start_cursor=start_cursor,
        batch_records=batch_records,
        allow_partial=allow_partial,
        no_shuffle=not shuffle,
    )


class _Submission:
    """The SubmitJob message stream of a precompute request: the spec, then sequences or texts.

    ``messages()`` can be called again for a retry when the input is re-iterable (a list, an
    array, or any object whose ``__iter__`` starts over); a one-shot iterator is sent once and not
    retried. An error raised while building messages (a bad item in the input) is kept in
    ``error`` and raised in place of what grpc makes of it (UNKNOWN "Exception iterating
    requests", or a cancelled call in grpc.aio).
    """

    def __init__(
        self,
        dataset: str,
        *,
        texts: Iterable[str] | None,
        input_ids: Iterable[Any] | None,
        server_path: str | None,
        teacher: str | None,
        top_k: int | None,
        max_len: int | None,
        overflow: str | None,
        license: str | None,
    ) -> None:
        if sum(x is not None for x in (texts, input_ids, server_path)) != 1:
            raise ValueError("give exactly one of texts=, input_ids= or server_path=")
        self.spec = pb.JobSpec(
            dataset=dataset,
            teacher=teacher or "",
            top_k=top_k or 0,
            server_path=server_path or "",
            max_len=max_len or 0,
            overflow=overflow or "",
            license=license or "",
        )
        self.texts = texts
        self.input_ids = input_ids
        source = texts if texts is not None else input_ids
        self.replayable = source is None or iter(source) is not source
        self.error: BaseException | None = None

    def messages(self) -> Iterator[pb.SubmitJobRequest]:
        try:
            yield pb.SubmitJobRequest(spec=self.spec)
            if self.texts is not None:
                for i, text in enumerate(self.texts):
                    if not isinstance(text, str):
                        raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a str")
                    yield pb.SubmitJobRequest(text=text)
            elif self.input_ids is not None:
                for i, ids in enumerate(self.input_ids):
                    yield pb.SubmitJobRequest(sequence=_sequence(ids, i))
        except Exception as e:
            self.error = e
            raise

    def raise_input_error(self, call_error: BaseException) -> None:
        if self.error is not None:
            raise self.error from call_error


def _job_id(job: str | pb.Job) -> str:
    return job.id if isinstance(job, pb.Job) else job


def _job_outcome(job: pb.Job) -> pb.Job:
    """The job if it completed; RuntimeError with the server's reason if it did not."""
    if job.state == "failed":
        raise RuntimeError(f"job {job.id} ({job.spec.dataset}) failed: {job.error}")
    if job.state == "cancelled":
        raise RuntimeError(f"job {job.id} ({job.spec.dataset}) was cancelled")
    return job


class _JobProgress:
    """A tqdm bar over a job's positions, with rate and ETA; by default only on a terminal."""

    def __init__(self, show: bool | None) -> None:
        self.show = sys.stderr.isatty() if show is None else show
        self._bar = None

    def update(self, job: pb.Job) -> None:
        if not self.show:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=job.positions_total or None,
                initial=job.positions_done,
                unit="pos",
                unit_scale=True,
                desc=f"job {job.id} {job.spec.dataset}",
                file=sys.stderr,
            )
        self._bar.set_postfix_str(job.state, refresh=False)
        self._bar.update(job.positions_done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ---- stream state shared by both clients ----------------------------------------------------


class _Pipeline:
    """Bookkeeping of a pipelined read-through stream (``get_distributions_iter``).

    Requests go through an outbox queue that grpc drains on its own (thread or task), so the
    caller reads responses while requests are still being written. Up to ``window`` requests are
    in flight. Responses come in request order, so each answers the oldest pending request. A
    broken stream is reopened with a new outbox holding the pending requests again: the
    read-through cache makes resending idempotent.
    """

    def __init__(
        self, teacher: str | None, top_k: int | None, window: int, new_outbox: Callable[[], Any]
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.teacher = teacher
        self.top_k = top_k
        self.window = window
        self._new_outbox = new_outbox
        self._outbox: Any = None  # a queue of requests; None in it ends the request stream
        self._pending: deque[pb.DistributionsRequest] = deque()
        self._exhausted = False  # the caller's batches have all been read

    def reopen(self) -> Any:
        """A new outbox for a new call, holding the requests not answered yet."""
        self.close()
        self._outbox = self._new_outbox()
        for request in self._pending:
            self._outbox.put_nowait(request)
        if self._exhausted:
            self._outbox.put_nowait(None)
        return self._outbox

    def wants_more(self) -> bool:
        return not self._exhausted and len(self._pending) < self.window

    def put(self, batch: Any) -> None:
        """Send a batch of sequences, or end the requests when ``batch`` is ``_END``."""
        if batch is _END:
            self._exhausted = True
            self._outbox.put_nowait(None)
            return
        request = _distributions_request(batch, self.teacher, self.top_k)
        self._pending.append(request)
        self._outbox.put_nowait(request)

    def answered(self, response: pb.DistributionsResponse) -> list[Record]:
        if not self._pending:
            raise ValueError("server sent a response to no request")
        return _records(response, self._pending.popleft())

    def close(self) -> None:
        """End the current outbox (releases grpc's reader of a broken or finished call)."""
        if self._outbox is not None:
            self._outbox.put_nowait(None)


class _CursorBuffer:
    """A StreamDataset request and the records of the batches received, handed out one by one.

    ``received`` is the cursor of the last batch received: a broken stream reopens there.
    ``cursor`` is the cursor of the last batch whose every record was handed out: a caller
    resumes there with ``start_cursor``.
    """

    def __init__(self, request: pb.StreamDatasetRequest) -> None:
        self._request = request
        self.cursor = self.received = request.start_cursor
        self._records: deque[tuple[Record, int | None]] = deque()

    def request(self) -> pb.StreamDatasetRequest:
        """The request that (re)opens the stream right after the last batch received."""
        self._request.start_cursor = self.received
        return self._request

    def push(self, batch: pb.RecordBatch) -> None:
        records = decode_batch(batch)
        for i, record in enumerate(records):
            self._records.append((record, batch.cursor if i == len(records) - 1 else None))
        self.received = batch.cursor

    def __bool__(self) -> bool:
        return bool(self._records)

    def pop(self) -> Record:
        record, cursor = self._records.popleft()
        if cursor is not None:
            self.cursor = cursor
        return record


# ---- blocking client ------------------------------------------------------------------------


class DatasetStream(Iterator[Record]):
    """Records of a StreamDataset call. ``cursor`` resumes right after the last whole batch.

    Pass ``start_cursor=stream.cursor`` to ``stream_dataset`` to continue later; records of a
    batch that was only partly consumed are delivered again. ``close()`` ends the call early.
    """

    def __init__(self, client: Client, request: pb.StreamDatasetRequest) -> None:
        self._buffer = _CursorBuffer(request)
        self._batches = client._resuming(lambda: client._stub.StreamDataset(self._buffer.request()))

    @property
    def cursor(self) -> int:
        return self._buffer.cursor

    def __iter__(self) -> DatasetStream:
        return self

    def __next__(self) -> Record:
        while not self._buffer:
            self._buffer.push(next(self._batches))
        return self._buffer.pop()

    def close(self) -> None:
        self._batches.close()


class Client:
    """Blocking client of a logitcache server at ``target`` ("host:port").

    ``timeout`` is the deadline in seconds of each unary call attempt; ``retries`` bounds the
    consecutive UNAVAILABLE retries of any call; ``max_message_bytes`` caps messages both ways
    (match the server's ``--max-message-bytes``). Use as a context manager or call ``close()``.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        max_message_bytes: int = 256 << 20,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._backoff = _Backoff(retries)
        self._channel = grpc.insecure_channel(target, options=_channel_options(max_message_bytes))
        self._stub = pb_grpc.LogitCacheStub(self._channel)

    # -- call layer -----------------------------------------------------------------------------

    def _retrying(self, call: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                delay = self._backoff.delay(e, attempt)
                if delay is None:
                    raise
                time.sleep(delay)
                attempt += 1

    def _unary(self, method: str, request: Any) -> Any:
        return self._retrying(lambda: getattr(self._stub, method)(request, timeout=self.timeout))

    def _resuming(self, open_call: Callable[[], Any]) -> Iterator[Any]:
        """Messages of a server stream, reopened with ``open_call()`` after UNAVAILABLE."""
        attempt = 0
        while True:
            call = None
            try:
                call = open_call()
                for message in call:
                    attempt = 0
                    yield message
                return
            except grpc.RpcError as e:
                delay = self._backoff.delay(e, attempt)
                if delay is None:
                    raise
                time.sleep(delay)
                attempt += 1
            finally:
                if call is not None:
                    call.cancel()

    # -- teachers and datasets ------------------------------------------------------------------

    def list_teachers(self) -> pb.ListTeachersResponse:
        """The teachers the server runs (``.teachers``) and the default's name."""
        return self._unary("ListTeachers", pb.ListTeachersRequest())

    def list_datasets(self) -> list[pb.DatasetInfo]:
        return list(self._unary("ListDatasets", pb.ListDatasetsRequest()).datasets)

    def describe_dataset(self, name: str) -> pb.DatasetInfo:
        """Capture space, sizes and provenance of a dataset; NOT_FOUND if there is none."""
        return self._unary("DescribeDataset", pb.DescribeDatasetRequest(dataset=name))

    # -- read-through ---------------------------------------------------------------------------

    def get_distributions(
        self, sequences: Iterable[Any], *, teacher: str | None = None, top_k: int | None = None
    ) -> list[Record]:
        """One record per sequence (lists or arrays of token ids), in the same order.

        Cached sequences come from the store, the others are computed by the teacher.
        ``teacher`` and ``top_k`` default to the server's defaults.
        """
        request = _distributions_request(sequences, teacher, top_k)

        def call() -> list[Record]:
            (response,) = self._stub.GetDistributions(iter([request]), timeout=self.timeout)
            return _records(response, request)

        return self._retrying(call)

    def get_distributions_iter(
        self,
        batches: Iterable[Iterable[Any]],
        *,
        teacher: str | None = None,
        top_k: int | None = None,
        window: int = 8,
    ) -> Iterator[list[Record]]:
        """The records of each batch of sequences, in order, over one stream.

        Up to ``window`` batches are in flight at once (read ahead from ``batches``), so the
        server works on the next batches while the caller handles one.
        """
        pipe = _Pipeline(teacher, top_k, window, queue.SimpleQueue)
        batches = iter(batches)

        def fill() -> None:
            while pipe.wants_more():
                pipe.put(next(batches, _END))

        def open_call() -> Any:
            outbox = pipe.reopen()
            fill()
            return self._stub.GetDistributions(iter(outbox.get, None))

        try:
            for response in self._resuming(open_call):
                yield pipe.answered(response)
                fill()
        finally:
            pipe.close()

    # -- streaming ------------------------------------------------------------------------------

    def stream_dataset(
        self,
        dataset: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        start_cursor: int = 0,
        batch_records: int = 0,
        allow_partial: bool = False,
        shuffle: bool = True,
    ) -> DatasetStream:
        """This rank's records of ``dataset`` in the (seed, epoch) order; see ``DatasetStream``.

        ``batch_records`` is the records per server batch (0: the server's default); a stream
        broken by UNAVAILABLE reopens after the last batch received, so every record is
        delivered exactly once.
        """
        request = _stream_request(
            dataset, rank=rank, world_size=world_size, seed=seed, epoch=epoch,
            start_cursor=start_cursor, batch_records=batch_records, allow_partial=allow_partial,
            shuffle=shuffle,
        )  # fmt: skip
        return DatasetStream(self, request)

    # -- jobs -----------------------------------------------------------------------------------

    def precompute(
        self,
        dataset: str,
        *,
        texts: Iterable[str] | None = None,
        input_ids: Iterable[Any] | None = None,
        server_path: str | None = None,
        teacher: str | None = None,
        top_k: int | None = None,
        max_len: int | None = None,
        overflow: str | None = None,
        license: str | None = None,
    ) -> str:
        """Submit a job that builds ``dataset`` from texts, token sequences or a server file.

        Exactly one of ``texts``, ``input_ids`` or ``server_path`` (a JSONL or Parquet file the
        server can read). ``overflow`` says what happens to sequences over ``max_len``: "error"
        (the default), "truncate" or "split". The server checks the whole input before it accepts
        the job. Returns the job id; follow the job with ``wait``, ``watch_job`` or ``get_job``.
        A one-shot iterator as input is sent once (not retried on UNAVAILABLE).
        """
        submission = _Submission(
            dataset, texts=texts, input_ids=input_ids, server_path=server_path, teacher=teacher,
            top_k=top_k, max_len=max_len, overflow=overflow, license=license,
        )  # fmt: skip

        def call() -> pb.Job:
            try:
                return self._stub.SubmitJob(submission.messages(), timeout=self.timeout)
            except grpc.RpcError as e:
                submission.raise_input_error(e)
                raise

        return (self._retrying(call) if submission.replayable else call()).id

    def get_job(self, job_id: str) -> pb.Job:
        return self._unary("GetJob", pb.GetJobRequest(id=job_id))

    def list_jobs(self) -> list[pb.Job]:
        """All jobs, newest first."""
        return list(self._unary("ListJobs", pb.ListJobsRequest()).jobs)

    def cancel_job(self, job_id: str) -> pb.Job:
        """Stop a queued or running job; FAILED_PRECONDITION if it has already ended."""
        return self._unary("CancelJob", pb.CancelJobRequest(id=job_id))

    def watch_job(self, job_id: str) -> Iterator[pb.Job]:
        """The job now and after every change, until it ends."""
        request = pb.WatchJobRequest(id=job_id)
        return self._resuming(lambda: self._stub.WatchJob(request))

    def wait(self, job: str | pb.Job, *, progress: bool | None = None) -> pb.Job:
        """Block until the job ends: the final Job, or RuntimeError if it failed or was cancelled.

        ``progress``: show a progress bar on stderr (default: when stderr is a terminal).
        """
        bar = _JobProgress(progress)
        state = None
        try:
            while state is None or state.state not in ENDED:
                for state in self.watch_job(_job_id(job)):
                    bar.update(state)
        finally:
            bar.close()
        return _job_outcome(state)

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- asyncio client -------------------------------------------------------------------------


class AsyncDatasetStream(AsyncIterator[Record]):
    """``DatasetStream`` for ``async for``; ``cursor`` has the same meaning."""

    def __init__(self, client: AsyncClient, request: pb.StreamDatasetRequest) -> None:
        self._buffer = _CursorBuffer(request)

        async def open_call() -> Any:
            return client._stub.StreamDataset(self._buffer.request())

        self._batches = client._resuming(open_call)

    @property
    def cursor(self) -> int:
        return self._buffer.cursor

    def __aiter__(self) -> AsyncDatasetStream:
        return self

    async def __anext__(self) -> Record:
        while not self._buffer:
            self._buffer.push(await anext(self._batches))
        return self._buffer.pop()

    async def aclose(self) -> None:
        await self._batches.aclose()


class AsyncClient:
    """The asyncio twin of :class:`Client` over grpc.aio: the same methods and arguments, as
    coroutines (``await``) and async iterators (``async for``). Create it in the event loop that
    uses it; ``async with`` or ``await client.close()``.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        max_message_bytes: int = 256 << 20,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._backoff = _Backoff(retries)
        self._channel = grpc.aio.insecure_channel(
            target, options=_channel_options(max_message_bytes)
        )
        self._stub = pb_grpc.LogitCacheStub(self._channel)

    # -- call layer -----------------------------------------------------------------------------

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await call()
            except grpc.RpcError as e:
                delay = self._backoff.delay(e, attempt)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                attempt += 1

    async def _unary(self, method: str, request: Any) -> Any:
        return await self._retrying(
            lambda: getattr(self._stub, method)(request, timeout=self.timeout)
        )

    async def _resuming(self, open_call: Callable[[], Awaitable[Any]]) -> AsyncIterator[Any]:
        attempt = 0
        while True:
            call = None
            try:
                call = await open_call()
                async for message in call:
                    attempt = 0
                    yield message
                return
            except grpc.RpcError as e:
                delay = self._backoff.delay(e, attempt)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                attempt += 1
            finally:
                if call is not None:
                    call.cancel()

    # -- teachers and datasets ------------------------------------------------------------------

    async def list_teachers(self) -> pb.ListTeachersResponse:
        return await self._unary("ListTeachers", pb.ListTeachersRequest())

    async def list_datasets(self) -> list[pb.DatasetInfo]:
        return list((await self._unary("ListDatasets", pb.ListDatasetsRequest())).datasets)

    async def describe_dataset(self, name: str) -> pb.DatasetInfo:
        return await self._unary("DescribeDataset", pb.DescribeDatasetRequest(dataset=name))

    # -- read-through ---------------------------------------------------------------------------

    async def get_distributions(
        self, sequences: Iterable[Any], *, teacher: str | None = None, top_k: int | None = None
    ) -> list[Record]:
        request = _distributions_request(sequences, teacher, top_k)

        async def call() -> list[Record]:
            responses = [
                r async for r in self._stub.GetDistributions(iter([request]), timeout=self.timeout)
            ]
            if len(responses) != 1:
                raise ValueError(f"server sent {len(responses)} responses to one request")
            return _records(responses[0], request)

        return await self._retrying(call)

    async def get_distributions_iter(
        self,
        batches: Iterable[Iterable[Any]] | AsyncIterable[Iterable[Any]],
        *,
        teacher: str | None = None,
        top_k: int | None = None,
        window: int = 8,
    ) -> AsyncIterator[list[Record]]:
        """``Client.get_distributions_iter``; ``batches`` may also be an async iterable."""
        pipe = _Pipeline(teacher, top_k, window, asyncio.Queue)
        source = _aiter_of(batches)

        async def fill() -> None:
            while pipe.wants_more():
                pipe.put(await anext(source, _END))

        async def open_call() -> Any:
            outbox = pipe.reopen()
            await fill()
            return self._stub.GetDistributions(_drain(outbox))

        try:
            async for response in self._resuming(open_call):
                yield pipe.answered(response)
                await fill()
        finally:
            pipe.close()

    # -- streaming ------------------------------------------------------------------------------

    def stream_dataset(
        self,
        dataset: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        start_cursor: int = 0,
        batch_records: int = 0,
        allow_partial: bool = False,
        shuffle: bool = True,
    ) -> AsyncDatasetStream:
        """``async for record in client.stream_dataset(...)``; see ``Client.stream_dataset``."""
        request = _stream_request(
            dataset, rank=rank, world_size=world_size, seed=seed, epoch=epoch,
            start_cursor=start_cursor, batch_records=batch_records, allow_partial=allow_partial,
            shuffle=shuffle,
        )  # fmt: skip
        return AsyncDatasetStream(self, request)

    # -- jobs -----------------------------------------------------------------------------------

    async def precompute(
        self,
        dataset: str,
        *,
        texts: Iterable[str] | None = None,
        input_ids: Iterable[Any] | None = None,
        server_path: str | None = None,
        teacher: str | None = None,
        top_k: int | None = None,
        max_len: int | None = None,
        overflow: str | None = None,
        license: str | None = None,
    ) -> str:
        """See ``Client.precompute``."""
        submission = _Submission(
            dataset, texts=texts, input_ids=input_ids, server_path=server_path, teacher=teacher,
            top_k=top_k, max_len=max_len, overflow=overflow, license=license,
        )  # fmt: skip

        async def call() -> pb.Job:
            try:
                return await self._stub.SubmitJob(submission.messages(), timeout=self.timeout)
            except (grpc.RpcError, asyncio.CancelledError) as e:
                submission.raise_input_error(e)
                raise

        return (await (self._retrying(call) if submission.replayable else call())).id

    async def get_job(self, job_id: str) -> pb.Job:
        return await self._unary("GetJob", pb.GetJobRequest(id=job_id))

    async def list_jobs(self) -> list[pb.Job]:
        return list((await self._unary("ListJobs", pb.ListJobsRequest())).jobs)

    async def cancel_job(self, job_id: str) -> pb.Job:
        return await self._unary("CancelJob", pb.CancelJobRequest(id=job_id))

    def watch_job(self, job_id: str) -> AsyncIterator[pb.Job]:
        request = pb.WatchJobRequest(id=job_id)

        async def open_call() -> Any:
            return self._stub.WatchJob(request)

        return self._resuming(open_call)

    async def wait(self, job: str | pb.Job, *, progress: bool | None = None) -> pb.Job:
        """See ``Client.wait``."""
        bar = _JobProgress(progress)
        state = None
        try:
            while state is None or state.state not in ENDED:
                async for state in self.watch_job(_job_id(job)):
                    bar.update(state)
        finally:
            bar.close()
        return _job_outcome(state)

    # -- lifetime -------------------------------------------------------------------------------

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _drain(outbox: asyncio.Queue) -> AsyncIterator[Any]:
    while (item := await outbox.get()) is not None:
        yield item


async def _aiter_of(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
