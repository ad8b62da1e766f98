"""One background event loop that runs the asyncio client for blocking callers.

:class:`~logitcache.client.client.AsyncClient` is the only implementation of the client; the
blocking :class:`~logitcache.client.client.Client` runs it here. :func:`sync` submits a coroutine
to a single loop thread, started on first use and shared by every Client of the process, and
blocks the calling thread until it is done, so a Client works from any number of threads, and
from a thread that runs an event loop of its own (a Jupyter cell), which it blocks like any other
blocking call does. An async iterator becomes a blocking one with :class:`SyncIterator`.

After ``fork`` the child starts a loop of its own on first use: the parent's loop thread does not
exist there (and a Client lets go of its channel before the fork, see ``client.py``).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import queue
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def _running_loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    """The loop thread, started on first use."""
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="logitcache-client", daemon=True
            )
            thread.start()
            _loop, _thread = loop, thread
        return _loop, _thread


def sync(coro: Coroutine[Any, Any, T], feed: Feed[Any] | None = None) -> T:
    """Run ``coro`` on the loop thread and return its result (or raise its exception) here.

    With ``feed``, the calling thread reads the feed's iterable for the coroutine while it waits.
    An interrupt of the waiting thread (Ctrl-C) cancels the coroutine.
    """
    loop, thread = _running_loop()
    if threading.current_thread() is thread:
        coro.close()
        raise RuntimeError(
            "a blocking Client call from inside the client's own event loop would wait forever; "
            "use AsyncClient in coroutines and async iterators that the client runs"
        )
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        if feed is not None:
            feed.serve(future, loop)
        return future.result()
    except BaseException:
        future.cancel()  # a no-op when the coroutine itself raised
        raise
    finally:
        # The error raised here holds this frame, which would hold the future, which holds the
        # error: a cycle that would keep the failed call (and its channel) until a gc pass.
        del future


class Feed(AsyncIterator[T]):
    """An iterable that a coroutine on the loop reads through the thread waiting in ``sync``.

    The caller's iterable is then read where the caller runs it, as a blocking call would: it
    may use thread-bound objects, block, or make blocking Client calls itself, without holding
    up the loop that every Client shares.
    """

    def __init__(self, items: Iterable[T]) -> None:
        self._items = iter(items)
        self._reads: queue.SimpleQueue[asyncio.Future[tuple[T] | None] | None] = queue.SimpleQueue()

    def __aiter__(self) -> Feed[T]:
        return self

    async def __anext__(self) -> T:
        read: asyncio.Future[tuple[T] | None] = asyncio.get_running_loop().create_future()
        self._reads.put(read)
        item = await read
        if item is None:
            raise StopAsyncIteration
        return item[0]

    def serve(self, done: concurrent.futures.Future[Any], loop: asyncio.AbstractEventLoop) -> None:
        """Answer reads in this thread until ``done`` completes."""
        done.add_done_callback(lambda _: self._reads.put(None))  # wakes the wait below
        while not done.done():
            read = self._reads.get()
            if read is None:
                continue
            try:
                item: tuple[T] | None = (next(self._items),)
            except StopIteration:
                item = None
            except Exception as e:  # the caller's error, raised where the coroutine reads
                loop.call_soon_threadsafe(_settle, read, None, e)
                continue
            loop.call_soon_threadsafe(_settle, read, item, None)


def _settle(read: asyncio.Future[Any], item: Any, error: BaseException | None) -> None:
    if read.done():  # the reading coroutine was cancelled meanwhile
        return
    if error is None:
        read.set_result(item)
    else:
        read.set_exception(error)


class SyncIterator(Iterator[T], Generic[T]):
    """A blocking iterator over an async iterator that runs on the loop thread.

    ``close()`` ends it early and closes the async iterator (a gRPC stream is cancelled); one
    dropped without ``close()`` is closed by the loop when it is garbage-collected.
    """

    def __init__(self, source: AsyncIterator[T], feed: Feed[Any] | None = None) -> None:
        self._source = source
        self._feed = feed
        self._done = False

    def __iter__(self) -> SyncIterator[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = sync(_step(self._source), self._feed)
        if item is None:
            self._done = True
            raise StopIteration
        return item[0]

    def close(self) -> None:
        if not self._done:
            self._done = True
            sync(_close(self._source))


async def _step(source: AsyncIterator[T]) -> tuple[T] | None:
    try:
        return (await anext(source),)
    except StopAsyncIteration:
        return None


async def _close(source: AsyncIterator[Any]) -> None:
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()


def _stop_loop() -> None:
    """At exit: stop the loop, so that it does not run while the interpreter shuts down."""
    with _lock:
        loop, thread = _loop, _thread
    if loop is not None and thread is not None and thread.is_alive():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)


def _forget_loop() -> None:
    """In a forked child: the parent's loop thread is not there; the next call starts one."""
    global _lock, _loop, _thread
    _lock, _loop, _thread = threading.Lock(), None, None


atexit.register(_stop_loop)
os.register_at_fork(after_in_child=_forget_loop)
