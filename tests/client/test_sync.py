"""The blocking Client over AsyncClient: one loop thread for every thread, a running event loop in
the caller, errors that keep their type, streams that end when the caller stops, close, fork.

The server is ``scripted_server.py`` in a process of its own: a real gRPC server of the contract
whose answers the tests know, and which reports how many of its streams are open.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from logitcache.client import Client
from logitcache.client.sync import sync

SEQUENCES = 40  # what the scripted server holds in dataset "ds"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port_file = tmp_path_factory.mktemp("scripted") / "port"
    script = Path(__file__).with_name("scripted_server.py")
    proc = subprocess.Popen([sys.executable, "-P", str(script), str(port_file)])
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text()):
            assert proc.poll() is None, "the scripted server exited"
            assert time.monotonic() < deadline, "the scripted server did not start"
            time.sleep(0.05)
        yield f"127.0.0.1:{port_file.read_text()}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def client(target: str) -> Iterator[Client]:
    with Client(target) as c:
        yield c


def open_streams(client: Client) -> int:
    return client.describe_dataset("open-streams").sequences


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_one_loop_thread_serves_every_thread(client: Client, target: str) -> None:
    expected = [r.key for r in client.stream_dataset("ds", batch_records=3)]
    assert len(expected) == SEQUENCES

    def read(c: Client) -> tuple[list[str], int]:
        keys = [r.key for r in c.stream_dataset("ds", batch_records=3)]
        return keys, c.describe_dataset("slow").sequences

    def work(i: int) -> tuple[list[str], int]:
        if i % 2:  # half the threads share the client, the others each have their own
            return read(client)
        with Client(target) as own:
            return read(own)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(16)))
    assert results == [(expected, 1)] * 16
    assert [t.name for t in threading.enumerate()].count("logitcache-client") == 1


def test_a_client_works_inside_a_running_event_loop(client: Client, target: str) -> None:
    async def cell() -> tuple[int, int, int]:  # what a Jupyter cell is: code on a running loop
        info = client.describe_dataset("ds")
        keys = [r.key for r in client.stream_dataset("ds")]
        with Client(target) as fresh:
            return info.sequences, len(keys), fresh.describe_dataset("ds").sequences

    assert asyncio.run(cell()) == (SEQUENCES, SEQUENCES, SEQUENCES)


def test_a_blocking_call_on_the_clients_own_loop_is_refused(client: Client) -> None:
    async def on_the_loop() -> object:
        return client.describe_dataset("ds")

    with pytest.raises(RuntimeError, match="own event loop"):
        sync(on_the_loop())


class BrokenInput(Exception):
    pass


def test_errors_surface_with_their_type(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as e:
        client.describe_dataset("no-such-dataset")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-dataset" in e.value.details()
    with pytest.raises(ValueError, match="negative token id"):
        client.get_distributions([[1, -2]])
    with pytest.raises(RuntimeError, match="the engine fell over"):
        client.wait("failed", progress=False)
    assert client.wait("done", progress=False).state == "completed"

    def batches() -> Iterator[list[list[int]]]:
        yield [[1, 2]]
        raise BrokenInput("the second batch")

    results = client.get_distributions_iter(batches(), window=1)
    assert len(next(results)) == 1
    with pytest.raises(BrokenInput, match="the second batch"):
        next(results)
    assert list(results) == []  # ended by the error, as a generator is


def test_batches_are_read_by_the_thread_that_iterates(client: Client) -> None:
    readers = []

    def batches() -> Iterator[list[np.ndarray]]:
        for i in range(6):
            readers.append(threading.current_thread())
            # A blocking call from inside the input: it is read in the caller's thread, not on
            # the loop that runs the stream, so this works as it did with a blocking stub.
            assert client.describe_dataset("ds").sequences == SEQUENCES
            yield [np.arange(i + 1), np.arange(2)]

    results = list(client.get_distributions_iter(batches(), window=3))
    assert readers == [threading.current_thread()] * 6
    assert [[len(r) for r in batch] for batch in results] == [[i + 1, 2] for i in range(6)]
    for i, batch in enumerate(results):
        np.testing.assert_array_equal(batch[0].input_ids, np.arange(i + 1))


@pytest.mark.parametrize("stop", ["close", "drop"])
def test_stopping_early_ends_the_server_streams(client: Client, stop: str) -> None:
    eventually(lambda: open_streams(client) == 0, "streams of earlier tests to end")
    stream = client.stream_dataset("endless", batch_records=2)
    jobs = client.watch_job("endless")
    assert len([next(stream) for _ in range(5)]) == 5
    assert next(jobs).state == "running"
    assert open_streams(client) == 2
    if stop == "close":
        stream.close()
        jobs.close()
        assert list(stream) == [] and list(jobs) == []
    else:  # dropped without close(), e.g. a loop left with break
        del stream, jobs
        gc.collect()
    eventually(lambda: open_streams(client) == 0, "the server streams to end")


def test_close_ends_open_streams_and_later_calls_fail(target: str) -> None:
    closing = Client(target)
    stream = closing.stream_dataset("endless", batch_records=1)
    next(stream)
    with Client(target) as observer:
        eventually(lambda: open_streams(observer) == 1, "the stream to open")
        closing.close()
        eventually(lambda: open_streams(observer) == 0, "the stream to end")
    with pytest.raises(grpc.aio.UsageError, match="closed"):
        closing.describe_dataset("ds")
    with pytest.raises(grpc.aio.UsageError, match="closed"):
        next(stream)
    closing.close()  # closing twice is harmless


FORK_AFTER_CLOSE = """
import os, sys
from logitcache.client import Client

with Client(sys.argv[1]) as client:  # what TeacherStream does before DataLoader workers start
    expected = [r.key for r in client.stream_dataset("ds", batch_records=4)]
    assert client.describe_dataset("ds").sequences == len(expected)
unused = Client(sys.argv[1])  # open, but never called: it has no channel yet
pid = os.fork()
if pid == 0:
    with Client(sys.argv[1]) as own:
        ok = [r.key for r in own.stream_dataset("ds")] == expected
    os._exit(0 if ok and unused.describe_dataset("ds").sequences == len(expected) else 1)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
with Client(sys.argv[1]) as again:
    assert [r.key for r in again.stream_dataset("ds")] == expected
"""

FORK_WHILE_OPEN = """
import os, sys
from logitcache.client import Client

client = Client(sys.argv[1])
expected = client.describe_dataset("ds").sequences
pid = os.fork()
if pid == 0:
    try:
        Client(sys.argv[1]).describe_dataset("ds")
    except RuntimeError as e:
        os._exit(0 if "forked while a logitcache client" in str(e) else 1)
    os._exit(2)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
assert client.describe_dataset("ds").sequences == expected  # the parent goes on
client.close()
"""


@pytest.mark.parametrize("script", [FORK_AFTER_CLOSE, FORK_WHILE_OPEN], ids=["closed", "open"])
def test_forking(target: str, script: str) -> None:
    """A child forked after its parent closed its clients (as before DataLoader workers start)
    uses grpc; one forked while a client was open is told so, instead of crashing or hanging in
    grpc. Each case runs in a fresh interpreter, whose only grpc objects are the clients'."""
    run = subprocess.run(
        [sys.executable, "-P", "-c", script, target], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
