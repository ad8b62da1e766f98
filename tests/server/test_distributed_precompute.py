"""A precompute split over 3 worker processes, one of them killed with SIGKILL mid-run and
retried, equals a one-worker run key for key and in order; progress shows in ``inspect``, and
``--finalize`` names the missing units until the last worker has run.

The workers are real ``logitcache precompute`` command lines, started together (they race to
publish the dataset), run by this file as a script on the transformers reference engine (it
starts in a second; the CLI's own engine is vLLM). The worker that is killed runs on an engine
that stops answering after a few sequences, so it is killed while it works, with some of its
records sealed and others not.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

K, UNIT, WORKERS, STALL_AFTER = 8, 2, 3, 2
DEADLINE_S = 300.0  # the longest wait for a worker (a deadline, not a speed bound)


def command(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--dataset", "d",
        "--top-k", str(K), "--no-progress", "--segment-positions", "32",
        "--max-len", "40", "--overflow", "truncate",
        "--unit-sequences", str(UNIT), *extra,
    ]  # fmt: skip


def worker(args: list[str], *, stall: Path | None = None, env: dict | None = None):
    prefix = ["--stall-after", str(STALL_AFTER), str(stall)] if stall else []
    return subprocess.Popen(
        [sys.executable, "-P", __file__, *prefix, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def finished(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0, err
    return out


def test_three_workers_one_killed_and_retried_equal_one_worker(
    demo_teacher: Path, tmp_path: Path, capsys
) -> None:
    import logitcache
    from logitcache.cli import main
    from logitcache.demo.language import generate_documents
    from logitcache.server.work_units import WorkShare

    data = tmp_path / "data.jsonl"
    docs = generate_documents(16, seed=5)
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs + docs[:2]))
    single, split = tmp_path / "single", tmp_path / "split"
    across = ["--workers", str(WORKERS)]

    stall, zeroth = tmp_path / "stalled", WorkShare(0, WORKERS, UNIT)
    first = worker(command(demo_teacher, data, split, *across, "--worker", "0"), stall=stall)
    others = [  # all three start together: they race to publish the dataset
        worker(command(demo_teacher, data, split, *across, "--worker", "1")),
        worker(command(demo_teacher, data, split, *across), env={"JOB_COMPLETION_INDEX": "2"}),
    ]
    try:
        outs = [finished(p) for p in others]
        deadline = time.monotonic() + DEADLINE_S
        while not (stall.exists() and _sealed(split, zeroth) > 0):
            assert first.poll() is None, first.communicate()[1]
            assert time.monotonic() < deadline, "worker 0 sealed nothing"
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL  # killed mid-run, not finished
    assert all("worker" in out for out in outs)
    assert all("dataset building" in out for out in outs)  # worker 0's units are missing

    described = asyncio.run(_described(split))  # what a server's DescribeDataset answers
    assert described["state"] == "building"
    assert 0 < described["sealed_sequences"] < described["sequences"] == len(docs) + 2
    capsys.readouterr()
    assert main(["inspect", str(split), "--dataset", "d", "--json"]) == 0
    units = json.loads(capsys.readouterr().out)["datasets"][0]["work_units"]
    assert units["units"] == -(-len(docs + docs[:2]) // UNIT) and units["workers_left"] == [0]
    assert main(["precompute", *command(demo_teacher, data, split, *across), "--finalize"]) == 2
    refused = capsys.readouterr().err
    assert "not complete" in refused and f"(workers 0 of {WORKERS})" in refused

    retried = finished(worker(command(demo_teacher, data, split, *across, "--worker", "0")))
    assert "dataset complete" in retried
    computed = int(re.search(r"computed (\d+) sequences", retried).group(1))
    share = int(WorkShare(0, WORKERS, UNIT).mine(len(docs) + 2).sum())
    assert 0 < computed < share  # what the killed run sealed is not computed again
    assert main(["precompute", *command(demo_teacher, data, split, *across), "--finalize"]) == 0

    _one_worker(command(demo_teacher, data, single))
    built, reference = logitcache.open_store(str(split)), logitcache.open_store(str(single))
    ds, expected = built.dataset("d"), reference.dataset("d")
    assert ds.complete and ds.keys == expected.keys and len(ds) == len(docs) + 2
    assert ds.provenance["work_units"] == {"unit_sequences": UNIT, "workers": WORKERS}
    for got, want in zip(ds, expected, strict=True):
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.token_ids, want.token_ids)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-6)


def test_a_share_is_the_same_units_whatever_the_number_of_workers() -> None:
    from logitcache.client.errors import InvalidArgument
    from logitcache.server.work_units import WorkShare

    shares = [WorkShare(i, 3, unit_sequences=4) for i in range(3)]
    masks = np.stack([s.mine(30) for s in shares])
    assert (masks.sum(axis=0) == 1).all()  # every sequence is one worker's
    np.testing.assert_array_equal(np.flatnonzero(masks[1]), [4, 5, 6, 7, 16, 17, 18, 19, 28, 29])
    assert WorkShare().mine(5).all() and not WorkShare().distributed
    with pytest.raises(InvalidArgument, match="not in 0..2"):
        WorkShare(3, 3)
    with pytest.raises(InvalidArgument, match="JOB_COMPLETION_INDEX"):
        WorkShare.of(None, 3, 4)


async def _described(store: Path) -> dict:
    from logitcache.server.store.store import open_store
    from logitcache.server.store.summary import StoreSummaries

    summaries = StoreSummaries(open_store(str(store)))
    await summaries.start()
    try:
        return await summaries.dataset("d")
    finally:
        await summaries.close()


def _sealed(store: Path, share) -> int:
    """How many of ``share``'s sequences are sealed in ``store`` so far."""
    import logitcache

    try:
        handle = logitcache.open_store(str(store))
        ds = handle.dataset("d")
    except Exception:  # not published yet
        return 0
    return sum(handle.contains(bytes(k)) for k in ds.raw_keys[share.mine(len(ds))])


def _one_worker(args: list[str]) -> None:
    from logitcache.cli import build_parser
    from logitcache.cli.precompute import precompute_command
    from logitcache.server.engine.reference import ReferenceEngine

    assert (
        precompute_command(build_parser().parse_args(["precompute", *args]), ReferenceEngine) == 0
    )


def _run_worker(argv: list[str]) -> int:
    """``[--stall-after N MARKER] PRECOMPUTE_FLAGS...``: one worker on the reference engine;
    with ``--stall-after`` its engine hangs (writing MARKER) after N sequences."""
    from logitcache.cli import build_parser
    from logitcache.cli.precompute import precompute_command
    from logitcache.server.engine.reference import ReferenceEngine

    factory = ReferenceEngine
    if argv[0] == "--stall-after":
        after, marker, argv = int(argv[1]), Path(argv[2]), argv[3:]

        class Stalling(ReferenceEngine):
            captured = 0

            async def capture(self, input_ids, k, priority=0):
                self.captured += 1
                if self.captured > after:
                    marker.touch()
                    await asyncio.Event().wait()  # hangs until killed
                return await super().capture(input_ids, k, priority)

        factory = Stalling
    return precompute_command(build_parser().parse_args(["precompute", *argv]), factory)


if __name__ == "__main__":
    sys.exit(_run_worker(sys.argv[1:]))
