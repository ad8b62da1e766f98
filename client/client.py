"""Clients of the logitcache gRPC service: :class:`AsyncClient` and the blocking :class:`Client`.

Both speak the wire contract in ``proto/logitcache/v1/logitcache.proto`` and return
:class:`~logitcache.client.record.Record` objects. :class:`AsyncClient` (grpc.aio) is the one
implementation; :class:`Client` runs it on the background loop thread of
:mod:`logitcache.client.sync`, one line per method, so both behave the same by construction. The
pieces the calls are made of are plain functions and small classes here: request builders,
decoders, the retry policy (:class:`_Backoff`), the pipelined read-through stream
(:class:`_Pipeline`), the dataset-stream cursor (:class:`_CursorBuffer`) and the job progress bar.

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
import gc
import os
import random
import sys
import uuid
import weakref
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from logitcache.client.errors import InvalidArgument
from logitcache.client.record import Record
from logitcache.client.sync import Feed, SyncIterator, sync
from logitcache.client.tls import PathLike, client_tls, open_channel, tls_mismatch, tls_refusal
from logitcache.client.use import Use
from logitcache.client.wire import decode_batch
from logitcache.v1 import logitcache_pb2 as pb
from logitcache.v1 import logitcache_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "AsyncDatasetStream", "Client", "DatasetStream", "ScoredIds"]

T = TypeVar("T")
ENDED = ("completed", "failed", "cancelled")
_END = object()  # end of the caller's batches

# ---- retry policy ---------------------------------------------------------------------------


class _Backoff:
    """Exponential backoff with jitter for UNAVAILABLE: the one retry policy of the client.

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


def _credentials(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries: ``authorization: Bearer`` with ``token``, else
    ``LOGITCACHE_TOKEN``; none without either (a single-user server on loopback)."""
    token = token if token is not None else os.environ.get("LOGITCACHE_TOKEN", "")
    token = token.strip()
    if not token:
        return ()
    if not token.isascii() or any(c.isspace() for c in token):
        raise InvalidArgument("a logitcache token is ASCII without spaces (lc_...)")
    return (("authorization", f"Bearer {token}"),)


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


def use_message(use: Use | None) -> pb.UseDeclaration | None:
    """The ``UseDeclaration`` of a declared use (None: none declared)."""
    if use is None:
        return None
    return pb.UseDeclaration(
        purpose=use.purpose,
        student_name=use.student_name,
        student_family=use.student_family,
        requester=use.requester,
        monthly_active_users=use.monthly_active_users,
    )


def _distributions_request(
    sequences: Iterable[Any],
    teacher: str | None,
    top_k: int | None,
    durable: bool = False,
    use: Use | None = None,
    mode: str | None = None,
    temperatures: Iterable[float] = (),
) -> pb.DistributionsRequest:
    return pb.DistributionsRequest(
        teacher=teacher or "",
        top_k=top_k or 0,
        mode=mode or "",
        temperatures=list(temperatures),
        sequences=[_sequence(s, i) for i, s in enumerate(sequences)],
        durable=durable,
        use=use_message(use),
    )


def _records(response: pb.DistributionsResponse, request: pb.DistributionsRequest) -> list[Record]:
    records = decode_batch(response.records)
    if len(records) != len(request.sequences):
        raise ValueError(
            f"server answered {len(records)} records for {len(request.sequences)} sequences"
        )
    return records


@dataclass(frozen=True)
class ScoredIds:
    """The teacher's answer for one sequence of ``score_ids``: ``logprobs`` [T, m] float32, the
    log-probs (T = 1, over the whole vocabulary) of the ids asked for, each in the place of its
    id in the [T, m] id array sent, and -inf where that array held no id (< 0); ``record``: the
    stored record of the sequence (the teacher's default capture space), or None."""

    logprobs: np.ndarray
    record: Record | None


def _id_sets(ids: Any, length: int, index: int) -> tuple[pb.IdSets, np.ndarray]:
    """One sequence's [T, m] ids (< 0: none) as IdSets, and where its ids are."""
    a = np.asarray(ids)
    if a.ndim != 2 or a.shape[0] != length or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(
            f"sequence {index}: expected integer ids to score of shape [{length}, m], got "
            f"{a.shape} {a.dtype}"
        )
    present = a >= 0
    return pb.IdSets(ids=a[present].tolist(), counts=present.sum(1).tolist()), present


def _score_ids_request(
    sequences: list[Any], ids_per_position: list[Any], teacher: str | None, use: Use | None
) -> tuple[pb.ScoreIdsRequest, list[np.ndarray]]:
    if len(ids_per_position) != len(sequences):
        raise ValueError(f"{len(ids_per_position)} id arrays for {len(sequences)} sequences")
    messages = [_sequence(s, i) for i, s in enumerate(sequences)]
    sets = [_id_sets(ids, len(m.input_ids), i)
            for i, (ids, m) in enumerate(zip(ids_per_position, messages, strict=True))]  # fmt: skip
    request = pb.ScoreIdsRequest(teacher=teacher or "", sequences=messages,
                                 ids=[s for s, _ in sets], use=use_message(use))  # fmt: skip
    return request, [present for _, present in sets]


def _scored(response: pb.ScoreIdsResponse, where: list[np.ndarray]) -> list[ScoredIds]:
    """Each sequence's scores back in the places of their ids, with its stored record."""
    if len(response.scores) != len(where) or len(response.has_stored) != len(where):
        raise ValueError(
            f"server answered {len(response.scores)} scores for {len(where)} sequences"
        )
    stored = iter(decode_batch(response.stored))
    out = []
    for scores, present, has in zip(response.scores, where, response.has_stored, strict=True):
        logprobs = np.full(present.shape, -np.inf, dtype=np.float32)
        logprobs[present] = np.asarray(scores.logprobs, dtype=np.float32)
        out.append(ScoredIds(logprobs, next(stored) if has else None))
    return out


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
    retried. The spec carries one ``client_request_id`` for all attempts, so a retry after a lost
    reply gets the job of the attempt that reached the server. An error raised while building messages (a bad item in the input) is kept in
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
        use: Use | None = None,
        sensitive_data: str | None = None,
        messages_field: str | None = None,
        mode: str | None = None,
        temperatures: Iterable[float] = (),
    ) -> None:
        if sum(x is not None for x in (texts, input_ids, server_path)) != 1:
            raise ValueError("give exactly one of texts=, input_ids= or server_path=")
        self.spec = pb.JobSpec(
            dataset=dataset,
            teacher=teacher or "",
            top_k=top_k or 0,
            mode=mode or "",
            temperatures=list(temperatures),
            server_path=server_path or "",
            max_len=max_len or 0,
            overflow=overflow or "",
            license=license or "",
            client_request_id=uuid.uuid4().hex,
            use=use_message(use),
            sensitive_data=sensitive_data or "",
            messages_field=messages_field or "",
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
        self._bar: Any = None  # a tqdm bar, made (and tqdm imported) on the first update

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


# ---- stream state ---------------------------------------------------------------------------


class _Pipeline:
    """Bookkeeping of a pipelined read-through stream (``get_distributions_iter``).

    Requests go through an outbox queue that grpc drains on its own task, so the caller reads
    responses while requests are still being written. Up to ``window`` requests are
    in flight. Responses come in request order, so each answers the oldest pending request. A
    broken stream is reopened with a new outbox holding the pending requests again: the
    read-through cache makes resending idempotent.
    """

    def __init__(
        self,
        teacher: str | None,
        top_k: int | None,
        window: int,
        use: Use | None = None,
        mode: str | None = None,
        temperatures: Iterable[float] = (),
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.teacher = teacher
        self.top_k = top_k
        self.mode = mode
        self.temperatures = list(temperatures)
        self.use = use
        self.window = window
        # The requests of the current call; None in it ends the request stream.
        self._outbox: asyncio.Queue[pb.DistributionsRequest | None] | None = None
        self._pending: deque[pb.DistributionsRequest] = deque()
        self._exhausted = False  # the caller's batches have all been read

    def reopen(self) -> asyncio.Queue[pb.DistributionsRequest | None]:
        """A new outbox for a new call, holding the requests not answered yet."""
        self.close()
        outbox: asyncio.Queue[pb.DistributionsRequest | None] = asyncio.Queue()
        for request in self._pending:
            outbox.put_nowait(request)
        if self._exhausted:
            outbox.put_nowait(None)
        self._outbox = outbox
        return outbox

    def wants_more(self) -> bool:
        return not self._exhausted and len(self._pending) < self.window

    def put(self, batch: Any) -> None:
        """Send a batch of sequences, or end the requests when ``batch`` is ``_END``."""
        assert self._outbox is not None, "reopen() first"
        if batch is _END:
            self._exhausted = True
            self._outbox.put_nowait(None)
            return
        request = _distributions_request(
            batch, self.teacher, self.top_k, use=self.use, mode=self.mode,
            temperatures=self.temperatures,
        )  # fmt: skip
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


# ---- the client -----------------------------------------------------------------------------


class AsyncDatasetStream(AsyncIterator[Record]):
    """Records of a StreamDataset call, for ``async for``; see :class:`DatasetStream`."""

    def __init__(self, client: AsyncClient, request: pb.StreamDatasetRequest) -> None:
        self._buffer = buffer = _CursorBuffer(request)

        async def open_call() -> Any:  # not a closure over self: a dropped stream is freed at once
            return client._stub.StreamDataset(buffer.request(), metadata=client._metadata)

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


class _Stream:
    """A server stream whose call ``cancel()`` lets go of, even while its reader is suspended
    between two messages (an async generator at a yield would hold the call, and through it
    the channel, for as long as the generator object lives)."""

    def __init__(self, call: Any, target: str) -> None:
        self._call = call
        self._target = target

    async def read(self) -> Any | None:
        """The next message, None at the end; UsageError once cancelled by the client's close."""
        call = self._call
        if call is None:
            raise grpc.aio.UsageError(f"the client of {self._target} was closed during the call")
        message = await call.read()
        return None if message is grpc.aio.EOF else message

    def cancel(self) -> Any:
        """Cancel the call and let go of it; the call, if it was still held."""
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        return call


class AsyncClient:
    """The client over grpc.aio: :class:`Client`'s methods and arguments, as coroutines
    (``await``) and async iterators (``async for``). Use it in one event loop (its channel is
    made on first use and belongs to that loop); ``async with`` or ``await client.close()``.

    Forking: grpc's asyncio layer is not fork-safe. A child forked while a channel exists, or
    while grpc still winds down one whose streams were just cancelled, cannot use grpc (it
    crashes or hangs). Close clients before a fork (``close()`` ends their streams and lets go
    of the channel); a child forked while one was open gets a RuntimeError that says so from its
    first call instead. Clients made in the child (as ``TeacherStream`` makes them in DataLoader
    workers) are fine; the spawn start method is the safe one for workers of a process that
    streams from a server while it starts them.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        max_message_bytes: int = 256 << 20,
        tls: bool | None = None,
        ca: PathLike | None = None,
        cert: PathLike | None = None,
        key: PathLike | None = None,
        token: str | None = None,
        use: Use | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.use = use  # declared with every job and read-through call that declares none
        self._metadata = _credentials(token)
        self._backoff = _Backoff(retries)
        self._tls = client_tls(tls, ca=ca, cert=cert, key=key)
        self._options = _channel_options(max_message_bytes)
        self._connection: tuple[grpc.aio.Channel, pb_grpc.LogitCacheStub] | None = None
        self._closed = False
        self._streams: weakref.WeakSet[_Stream] = weakref.WeakSet()  # its open server streams

    # -- channel --------------------------------------------------------------------------------

    @property
    def _stub(self) -> pb_grpc.LogitCacheStub:
        """The stub of the channel, which is made on first use (on the loop that uses it)."""
        global _channels_made
        if self._closed:
            raise grpc.aio.UsageError(f"the client of {self.target} is closed")
        if _forked_while_connected:
            raise RuntimeError(
                "this process was forked while a logitcache client of its parent was open, and "
                "grpc cannot run in such a child: close clients before forking (e.g. before "
                "DataLoader workers start), make them in the child, or start workers with spawn"
            )
        if self._connection is None:
            channel = open_channel(self.target, self._tls, self._options)
            self._connection = (channel, pb_grpc.LogitCacheStub(channel))
            _connected.add(self)
            _channels_made = True
        return self._connection[1]

    def _raise_if_closed(self) -> None:
        """After a CancelledError: UsageError if it was close() that cancelled the call, not a
        cancellation of the caller's task (whose CancelledError must go on)."""
        task = asyncio.current_task()
        if self._closed and task is not None and not task.cancelling():
            raise grpc.aio.UsageError(f"the client of {self.target} was closed during the call")

    # -- call layer -----------------------------------------------------------------------------

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await call()
            except grpc.RpcError as e:
                await self._raise_tls_mismatch(e, attempt)
                delay = self._backoff.delay(e, attempt)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                attempt += 1
            except asyncio.CancelledError:
                self._raise_if_closed()
                raise

    async def _raise_tls_mismatch(self, error: grpc.RpcError, attempt: int) -> None:
        """When a call's first failure is a connection the two sides' TLS did not agree on: an
        UNAVAILABLE that says so, at once (retrying cannot help), for grpc's "Socket closed"."""
        connection = self._connection
        if attempt or connection is None:
            return
        if connection[0].get_state() == grpc.ChannelConnectivity.READY:
            return  # connected: the server itself answered UNAVAILABLE
        message = await tls_mismatch(self.target, self._tls, error)
        if message is not None:
            raise tls_refusal(message) from None

    async def _unary(self, method: str, request: Any) -> Any:
        return await self._retrying(
            lambda: getattr(self._stub, method)(
                request, timeout=self.timeout, metadata=self._metadata
            )
        )

    async def _resuming(self, open_call: Callable[[], Awaitable[Any]]) -> AsyncGenerator[Any, None]:
        attempt = 0
        while True:
            stream = None
            try:
                stream = _Stream(await open_call(), self.target)
                self._streams.add(stream)
                while (message := await stream.read()) is not None:
                    attempt = 0
                    yield message
                return
            except grpc.RpcError as e:
                await self._raise_tls_mismatch(e, attempt)
                delay = self._backoff.delay(e, attempt)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                attempt += 1
            except asyncio.CancelledError:
                self._raise_if_closed()
                raise
            finally:
                if stream is not None:
                    stream.cancel()

    # -- teachers and datasets ------------------------------------------------------------------

    async def list_teachers(self) -> pb.ListTeachersResponse:
        return await self._unary("ListTeachers", pb.ListTeachersRequest())

    async def set_teacher_licence(
        self, teacher: str, licence: str = "", *, custom_json: str = ""
    ) -> pb.TeacherInfo:
        request = pb.SetTeacherLicenceRequest(
            teacher=teacher, licence=licence, custom_json=custom_json
        )
        return await self._unary("SetTeacherLicence", request)

    async def list_datasets(self) -> list[pb.DatasetInfo]:
        return list((await self._unary("ListDatasets", pb.ListDatasetsRequest())).datasets)

    async def describe_dataset(self, name: str) -> pb.DatasetInfo:
        return await self._unary("DescribeDataset", pb.DescribeDatasetRequest(dataset=name))

    async def finish_dataset(self, name: str) -> pb.DatasetInfo:
        return await self._unary("FinishDataset", pb.FinishDatasetRequest(dataset=name))

    async def resume_dataset(self, name: str) -> pb.Job:
        return await self._unary("ResumeDataset", pb.ResumeDatasetRequest(dataset=name))

    async def delete_dataset(self, name: str) -> pb.DeleteDatasetResponse:
        return await self._unary("DeleteDataset", pb.DeleteDatasetRequest(dataset=name))

    # -- read-through ---------------------------------------------------------------------------

    async def get_distributions(
        self,
        sequences: Iterable[Any],
        *,
        teacher: str | None = None,
        top_k: int | None = None,
        durable: bool = False,
        use: Use | None = None,
        mode: str | None = None,
        temperatures: Iterable[float] = (),
    ) -> list[Record]:
        request = _distributions_request(
            sequences, teacher, top_k, durable, use or self.use, mode, temperatures
        )

        async def call() -> list[Record]:
            return _records(await self._one_answer(self._stub.GetDistributions, request), request)

        return await self._retrying(call)

    async def get_distributions_iter(
        self,
        batches: Iterable[Iterable[Any]] | AsyncIterable[Iterable[Any]],
        *,
        teacher: str | None = None,
        top_k: int | None = None,
        window: int = 8,
        use: Use | None = None,
        mode: str | None = None,
        temperatures: Iterable[float] = (),
    ) -> AsyncIterator[list[Record]]:
        """``Client.get_distributions_iter``; ``batches`` may also be an async iterable."""
        pipe = _Pipeline(teacher, top_k, window, use or self.use, mode, temperatures)
        source = _aiter_of(batches)

        async def fill() -> None:
            while pipe.wants_more():
                pipe.put(await anext(source, _END))

        async def open_call() -> Any:
            outbox = pipe.reopen()
            await fill()
            return self._stub.GetDistributions(_drain(outbox), metadata=self._metadata)

        try:
            async for response in self._resuming(open_call):
                yield pipe.answered(response)
                await fill()
        finally:
            pipe.close()

    # -- scoring ids ----------------------------------------------------------------------------

    async def score_ids(
        self,
        sequences: Iterable[Any],
        ids_per_position: Iterable[Any],
        *,
        teacher: str | None = None,
        use: Use | None = None,
    ) -> list[ScoredIds]:
        """See ``Client.score_ids``."""
        request, where = _score_ids_request(
            list(sequences), list(ids_per_position), teacher, use or self.use
        )

        async def call() -> list[ScoredIds]:
            return _scored(await self._one_answer(self._stub.ScoreIds, request), where)

        return await self._retrying(call)

    async def _one_answer(self, method: Any, request: Any) -> Any:
        """The one response of a request-per-response stream (GetDistributions, ScoreIds) that
        is sent a single request."""
        responses = [
            r async for r in method(iter([request]), timeout=self.timeout, metadata=self._metadata)
        ]
        if len(responses) != 1:
            raise ValueError(f"server sent {len(responses)} responses to one request")
        return responses[0]

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
        use: Use | None = None,
        sensitive_data: str | None = None,
        messages_field: str | None = None,
        mode: str | None = None,
        temperatures: Iterable[float] = (),
    ) -> str:
        """See ``Client.precompute``."""
        submission = _Submission(
            dataset, texts=texts, input_ids=input_ids, server_path=server_path, teacher=teacher,
            top_k=top_k, max_len=max_len, overflow=overflow, license=license,
            use=use or self.use, sensitive_data=sensitive_data, messages_field=messages_field,
            mode=mode, temperatures=temperatures,
        )  # fmt: skip

        async def call() -> pb.Job:
            try:
                return await self._stub.SubmitJob(
                    submission.messages(), timeout=self.timeout, metadata=self._metadata
                )
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
            return self._stub.WatchJob(request, metadata=self._metadata)

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

    # -- governance (admin role; share_dataset also a dataset's owner) ---------------------------

    async def create_token(
        self, user: str, role: str, groups: Iterable[str] = ()
    ) -> pb.CreateTokenResponse:
        request = pb.CreateTokenRequest(user=user, role=role, groups=list(groups))
        return await self._unary("CreateToken", request)

    async def list_tokens(self) -> list[pb.TokenInfo]:
        return list((await self._unary("ListTokens", pb.ListTokensRequest())).tokens)

    async def revoke_token(self, token_id: str) -> pb.TokenInfo:
        return await self._unary("RevokeToken", pb.RevokeTokenRequest(id=token_id))

    async def set_limits(self, token_id: str, **limits: float) -> pb.TokenInfo:
        message = pb.Limits()
        for name, value in limits.items():
            setattr(message, name, value)  # AttributeError names a field Limits does not have
        request = pb.SetLimitsRequest(id=token_id, limits=message)
        return await self._unary("SetLimits", request)

    async def clear_flag(self, token_id: str) -> pb.TokenInfo:
        return await self._unary("ClearFlag", pb.ClearFlagRequest(id=token_id))

    async def share_dataset(
        self,
        dataset: str,
        *,
        add_users: Iterable[str] = (),
        add_groups: Iterable[str] = (),
        remove_users: Iterable[str] = (),
        remove_groups: Iterable[str] = (),
    ) -> pb.DatasetAccess:
        request = pb.ShareDatasetRequest(
            dataset=dataset,
            add_users=list(add_users),
            add_groups=list(add_groups),
            remove_users=list(remove_users),
            remove_groups=list(remove_groups),
        )
        return await self._unary("ShareDataset", request)

    # -- lifetime -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the channel and let go of it; streams still open on it end, and later calls
        raise UsageError."""
        self._closed = True
        connection, self._connection = self._connection, None
        _connected.discard(self)
        cancelled = [call for call in (s.cancel() for s in list(self._streams)) if call is not None]
        # code() returns once grpc has finished a call: nothing of it is left to settle later.
        await asyncio.gather(*(call.code() for call in cancelled))
        del cancelled
        if connection is not None:
            await connection[0].close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _drain(outbox: asyncio.Queue[pb.DistributionsRequest | None]) -> AsyncIterator[Any]:
    while (item := await outbox.get()) is not None:
        yield item


async def _aiter_of(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


# ---- the blocking client --------------------------------------------------------------------


class DatasetStream(SyncIterator[Record]):
    """Records of a StreamDataset call. ``cursor`` resumes right after the last whole batch.

    Pass ``start_cursor=stream.cursor`` to ``stream_dataset`` to continue later; records of a
    batch that was only partly consumed are delivered again. ``close()`` ends the call early.
    """

    def __init__(self, stream: AsyncDatasetStream) -> None:
        super().__init__(stream)
        self._stream = stream

    @property
    def cursor(self) -> int:
        return self._stream.cursor


class Client:
    """Blocking client of a logitcache server at ``target`` ("host:port").

    ``timeout`` is the deadline in seconds of each unary call attempt; ``retries`` bounds the
    consecutive UNAVAILABLE retries of any call; ``max_message_bytes`` caps messages both ways
    (match the server's ``--max-message-bytes``). Use as a context manager or call ``close()``.

    TLS: ``ca`` is the CA that signed the server's certificate (``tls=True`` alone trusts grpc's
    default roots); ``cert`` and ``key`` are this client's certificate for a server that requires
    one (mutual TLS). Unset, they come from ``LOGITCACHE_CA``, ``LOGITCACHE_CERT``,
    ``LOGITCACHE_KEY`` (and ``LOGITCACHE_TLS=1``); ``tls=False`` forces plaintext. A connection
    the two sides' TLS does not agree on (plaintext to a TLS port, a missing client certificate)
    fails at once with UNAVAILABLE and a message that says which.

    ``token``: the API token sent with every call (``authorization: Bearer``); unset, it comes
    from ``LOGITCACHE_TOKEN``. A server needs one unless it runs single-user on loopback
    (``--allow-anonymous``): without one, or with a revoked one, calls are UNAUTHENTICATED; a
    call the token's role or a dataset's access list does not allow is PERMISSION_DENIED.

    ``use``: what the distributions are for (:class:`~logitcache.client.use.Use`: purpose,
    student name and family, requester), declared with every job and read-through call that
    does not declare its own; the server's licence policy decides on it, and refuses a call
    that declares none.

    Each method is the :class:`AsyncClient` call run on the background loop thread of
    :mod:`logitcache.client.sync`, so one Client can serve several threads at once. Close it
    before the process forks (see :class:`AsyncClient`).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        max_message_bytes: int = 256 << 20,
        tls: bool | None = None,
        ca: PathLike | None = None,
        cert: PathLike | None = None,
        key: PathLike | None = None,
        token: str | None = None,
        use: Use | None = None,
    ) -> None:
        self._async = AsyncClient(
            target,
            timeout=timeout,
            retries=retries,
            max_message_bytes=max_message_bytes,
            tls=tls,
            ca=ca,
            cert=cert,
            key=key,
            token=token,
            use=use,
        )

    @property
    def target(self) -> str:
        return self._async.target

    @property
    def timeout(self) -> float:
        return self._async.timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._async.timeout = seconds

    # -- teachers and datasets ------------------------------------------------------------------

    def list_teachers(self) -> pb.ListTeachersResponse:
        """The teachers the server runs (``.teachers``) and the default's name."""
        return sync(self._async.list_teachers())

    def set_teacher_licence(
        self, teacher: str, licence: str = "", *, custom_json: str = ""
    ) -> pb.TeacherInfo:
        """Declare a teacher's licence (admin): a catalogue id such as "apache-2.0", or a custom
        entry as JSON in the catalogue's schema. FAILED_PRECONDITION if the server's
        configuration declares it; the teacher as it is now."""
        return sync(self._async.set_teacher_licence(teacher, licence, custom_json=custom_json))

    def list_datasets(self) -> list[pb.DatasetInfo]:
        return sync(self._async.list_datasets())

    def describe_dataset(self, name: str) -> pb.DatasetInfo:
        """Capture space, sizes and provenance of a dataset; NOT_FOUND if there is none."""
        return sync(self._async.describe_dataset(name))

    def finish_dataset(self, name: str) -> pb.DatasetInfo:
        """End a building dataset that nothing builds any more: state "partial" (or "complete")."""
        return sync(self._async.finish_dataset(name))

    def resume_dataset(self, name: str) -> pb.Job:
        """Run the newest job of a dataset that is not complete again; the job, queued."""
        return sync(self._async.resume_dataset(name))

    def delete_dataset(self, name: str) -> pb.DeleteDatasetResponse:
        """Remove a dataset (its records stay until gc); refused while it is being built."""
        return sync(self._async.delete_dataset(name))

    # -- read-through ---------------------------------------------------------------------------

    def get_distributions(
        self,
        sequences: Iterable[Any],
        *,
        teacher: str | None = None,
        top_k: int | None = None,
        durable: bool = False,
        use: Use | None = None,
        mode: str | None = None,
        temperatures: Iterable[float] = (),
    ) -> list[Record]:
        """One record per sequence (lists or arrays of token ids), in the same order.

        Cached sequences come from the store, the others are computed by the teacher.
        ``teacher`` and ``top_k`` default to the server's defaults. ``durable``: answered only
        once every record is sealed in the store (a server crash after the answer cannot lose
        them); RESOURCE_EXHAUSTED or UNAVAILABLE if the store cannot take them now. ``use``
        declares what the distributions are for (default: the client's); the server's licence
        policy refuses an undeclared use. ``mode``: the capture mode, as in ``precompute``
        (default "topk"), and ``temperatures``; each mode, k and set of temperatures is its own
        capture space.
        """
        return sync(
            self._async.get_distributions(
                sequences, teacher=teacher, top_k=top_k, durable=durable, use=use, mode=mode,
                temperatures=temperatures,
            )
        )  # fmt: skip

    def get_distributions_iter(
        self,
        batches: Iterable[Iterable[Any]],
        *,
        teacher: str | None = None,
        top_k: int | None = None,
        window: int = 8,
        use: Use | None = None,
        mode: str | None = None,
        temperatures: Iterable[float] = (),
    ) -> Iterator[list[Record]]:
        """The records of each batch of sequences, in order, over one stream.

        Up to ``window`` batches are in flight at once (read ahead from ``batches``, in the
        thread that iterates the result), so the server works on the next batches while the
        caller handles one.
        """
        feed = Feed(batches)
        return SyncIterator(
            self._async.get_distributions_iter(
                feed, teacher=teacher, top_k=top_k, window=window, use=use, mode=mode,
                temperatures=temperatures,
            ),
            feed,
        )  # fmt: skip

    # -- scoring ids ----------------------------------------------------------------------------

    def score_ids(
        self,
        sequences: Iterable[Any],
        ids_per_position: Iterable[Any],
        *,
        teacher: str | None = None,
        use: Use | None = None,
    ) -> list[ScoredIds]:
        """The teacher's log-probs of ids chosen per position (a student's own top-k), computed
        for this call and not cached: one :class:`ScoredIds` per sequence, in order.

        ``ids_per_position``: per sequence an integer array [T, m] (T its length), row t the
        ids to score after position t; entries < 0 mean none (pad rows of fewer ids with -1).
        At most the server's ``max_ids_per_position`` ids per position (``logitcache serve
        --max-ids-per-position``, default 256); more is INVALID_ARGUMENT naming that bound, and
        the ids of one call also count against the server's ``max_tokens_per_request``
        (RESOURCE_EXHAUSTED). The answer's ``logprobs`` has the same [T, m] shape, -inf
        where no id was asked, so a trainer gathers nothing; ``record`` is the sequence's
        stored record where the store has one. ``use`` as in :meth:`get_distributions`.
        """
        return sync(self._async.score_ids(sequences, ids_per_position, teacher=teacher, use=use))

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
        return DatasetStream(self._async.stream_dataset(
            dataset, rank=rank, world_size=world_size, seed=seed, epoch=epoch,
            start_cursor=start_cursor, batch_records=batch_records, allow_partial=allow_partial,
            shuffle=shuffle,
        ))  # fmt: skip

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
        use: Use | None = None,
        sensitive_data: str | None = None,
        messages_field: str | None = None,
        mode: str | None = None,
        temperatures: Iterable[float] = (),
    ) -> str:
        """Submit a job that builds ``dataset`` from texts, token sequences or a server file.

        Exactly one of ``texts``, ``input_ids`` or ``server_path`` (a JSONL or Parquet file the
        server can read). ``overflow`` says what happens to sequences over ``max_len``: "error"
        (the default), "truncate" or "split". The server checks the whole input before it accepts
        the job. Returns the job id; follow the job with ``wait``, ``watch_job`` or ``get_job``.
        A one-shot iterator as input is sent once (not retried on UNAVAILABLE). The input is read
        on the client's loop thread while it is sent. ``use`` declares what the distributions
        are for (default: the client's; required by the server's licence policy);
        ``sensitive_data`` is the dataset's filter action: "reject", "redact" (texts and chat
        messages) or "allow" (default: the server's). ``messages_field`` names the column of chat rows in a
        ``server_path`` input (``{"messages": [...]}``): they are rendered with the teacher's chat
        template and each sequence gets an assistant-only loss mask. ``mode`` is the capture
        mode as a capture space spells it: "topk" (the default), "top_p:P" (adaptive, at most
        ``top_k`` entries) or "sampled" (``top_k`` draws per position; 0: 12);
        ``temperatures`` (top-k and top-p only): each position's tail mass at these is stored
        too, so the trainer's losses at them are exact.
        """
        return sync(self._async.precompute(
            dataset, texts=texts, input_ids=input_ids, server_path=server_path, teacher=teacher,
            top_k=top_k, max_len=max_len, overflow=overflow, license=license, use=use,
            sensitive_data=sensitive_data, messages_field=messages_field, mode=mode,
            temperatures=temperatures,
        ))  # fmt: skip

    def get_job(self, job_id: str) -> pb.Job:
        return sync(self._async.get_job(job_id))

    def list_jobs(self) -> list[pb.Job]:
        """All jobs, newest first."""
        return sync(self._async.list_jobs())

    def cancel_job(self, job_id: str) -> pb.Job:
        """Stop a queued or running job; FAILED_PRECONDITION if it has already ended."""
        return sync(self._async.cancel_job(job_id))

    def watch_job(self, job_id: str) -> Iterator[pb.Job]:
        """The job now and after every change, until it ends."""
        return SyncIterator(self._async.watch_job(job_id))

    def wait(self, job: str | pb.Job, *, progress: bool | None = None) -> pb.Job:
        """Block until the job ends: the final Job, or RuntimeError if it failed or was cancelled.

        ``progress``: show a progress bar on stderr (default: when stderr is a terminal).
        """
        return sync(self._async.wait(job, progress=progress))

    # -- governance (admin role; share_dataset also a dataset's owner) ---------------------------

    def create_token(
        self, user: str, role: str, groups: Iterable[str] = ()
    ) -> pb.CreateTokenResponse:
        """A new token for ``user`` with ``role`` ("admin", "producer" or "consumer"): the
        answer's ``token`` is the only copy (the server keeps its hash), ``info`` its record."""
        return sync(self._async.create_token(user, role, groups))

    def list_tokens(self) -> list[pb.TokenInfo]:
        """Every token (never a secret), with its limits, today's usage and guard flag."""
        return sync(self._async.list_tokens())

    def revoke_token(self, token_id: str) -> pb.TokenInfo:
        """Revoke a token by its id; calls with it are UNAUTHENTICATED from then on."""
        return sync(self._async.revoke_token(token_id))

    def set_limits(self, token_id: str, **limits: float) -> pb.TokenInfo:
        """A token's own limits, by ``pb.Limits`` field (``positions_computed_per_day``,
        ``positions_served_per_day``, ``concurrent_streams``, ``requests_per_second``); a field
        not given (or 0) keeps the server's default."""
        return sync(self._async.set_limits(token_id, **limits))

    def clear_flag(self, token_id: str) -> pb.TokenInfo:
        """Lift the extraction guard's flag from a token."""
        return sync(self._async.clear_flag(token_id))

    def share_dataset(
        self,
        dataset: str,
        *,
        add_users: Iterable[str] = (),
        add_groups: Iterable[str] = (),
        remove_users: Iterable[str] = (),
        remove_groups: Iterable[str] = (),
    ) -> pb.DatasetAccess:
        """Change who may read a dataset (its owner or an admin); the new access list."""
        return sync(self._async.share_dataset(
            dataset, add_users=add_users, add_groups=add_groups, remove_users=remove_users,
            remove_groups=remove_groups,
        ))  # fmt: skip

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; streams still open on it end, and later calls raise UsageError."""
        sync(self._async.close())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_connected: weakref.WeakSet[AsyncClient] = weakref.WeakSet()  # clients with a channel
_channels_made = False  # whether this process has made a channel (and may have closed ones)
_forked_while_connected = False


def _collect_closed_channels() -> None:
    """Before a fork: a closed channel whose last calls sit in reference cycles would keep
    grpc's polling thread running into the child; a collection frees it."""
    if _channels_made:
        gc.collect()


def _note_fork_in_child() -> None:
    global _forked_while_connected
    _forked_while_connected = _forked_while_connected or bool(_connected)


os.register_at_fork(before=_collect_closed_channels, after_in_child=_note_fork_in_child)
