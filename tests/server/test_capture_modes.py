"""Capture modes end to end: `logitcache precompute` with --top-p, --mode sampled and the old codec.

`logitcache precompute` writes one store (datasets ``topp``, ``sampled``, ``v1``): ``topp`` in a
real CLI process with its own vLLM engine, the others by the same command in this process on the
session's engine (one engine start, not three). They are checked against the session's vLLM
engine (exact top-64 rows) and the transformers reference (full distributions); a store-only
server streams every dataset to ``TeacherStream`` and ``collate_records``; bad flag combinations
fail at once with one line and write nothing.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import logitcache
from logitcache.cli import main
from logitcache.client.record import Record
from logitcache.server.launcher import ServerProcess
from logitcache.trainer import TeacherStream
from logitcache.trainer.collate import collate_records

pytestmark = pytest.mark.slow

TOP_P, MAX_K, SAMPLES, V1_K = 0.9, 64, 12, 16
BOUND = 1 / 128  # the codecs' bound in nats (entries with p >= 1e-3, tails, targets)
CONTRACT_BOUND = 1 / 104  # the default codec's (topk-v5, the contract grid) for those entries
SMALL_P, SMALL_P_ERR = 1e-3, 1e-4  # below SMALL_P: |exp(decoded) - p| <= SMALL_P_ERR
# Two vLLM runs (the CLI's and the session engine) batch differently: fp32 values move ~1e-6.
NOISE = 1e-4
# The transformers reference is an independent fp32 computation: within 2e-3 nats of vLLM.
REF_NOISE = 2e-3
# "Within quantisation of P": a prefix mass read from 1/64-nat codes is off by at most this.
MASS_SLACK = TOP_P * (math.exp(BOUND) - 1)
DATASETS = {
    "topp": ("--top-p", str(TOP_P), "--max-k", str(MAX_K)),
    "sampled": ("--mode", "sampled", "--samples", str(SAMPLES)),
    "v1": ("--top-k", str(V1_K), "--codec", "topk-q64-delta-v1"),
}


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "logitcache.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def precompute_args(teacher: Path, data: Path, out: Path, dataset: str) -> list[str]:
    return ["--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--dataset", dataset, "--no-progress", *DATASETS[dataset]]  # fmt: skip


def precompute(teacher: Path, data: Path, out: Path, dataset: str) -> None:
    """A real CLI process, with a vLLM engine of its own."""
    r = cli("precompute", *precompute_args(teacher, data, out, dataset))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"dataset {dataset}:" in r.stdout


# ---- fixtures: one store written by the CLI, the engine's exact rows, a store-only server -------


@pytest.fixture(scope="module")
def sequences(demo_sequences: list) -> list[np.ndarray]:
    return [np.asarray(s, dtype=np.int32) for s in demo_sequences]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, sequences) -> Path:
    path = tmp_path_factory.mktemp("data") / "sequences.jsonl"
    path.write_text("".join(json.dumps({"input_ids": s.tolist()}) + "\n" for s in sequences))
    return path


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("capture") / "store"


@pytest.fixture(scope="module")
def top_p_dataset(store_dir: Path, demo_teacher: Path, data_file: Path) -> str:
    precompute(demo_teacher, data_file, store_dir, "topp")
    return "topp"


def _in_process_dataset(name: str):
    @pytest.fixture(scope="module")
    def written(store_dir: Path, demo_teacher: Path, data_file: Path,
                precompute_in_process) -> str:  # fmt: skip
        printed = precompute_in_process(*precompute_args(demo_teacher, data_file, store_dir, name))
        assert f"dataset {name}:" in printed
        return name

    return written


sampled_dataset = _in_process_dataset("sampled")
v1_dataset = _in_process_dataset("v1")


@pytest.fixture(scope="module")
def exact_rows(engine, loop_thread, sequences) -> list:
    """The session engine's exact top-64 rows of every sequence (captured concurrently)."""

    async def capture_all() -> list:
        return list(await asyncio.gather(*(engine.capture(s, MAX_K) for s in sequences)))

    return loop_thread.run(capture_all())


@pytest.fixture(scope="module")
def store_server(store_dir, top_p_dataset, sampled_dataset, v1_dataset) -> Iterator[str]:
    """A store-only server (no teacher) over the store with all three datasets."""
    with ServerProcess(None, store_dir, log_path=store_dir.parent / "serve.log") as server:
        yield "grpc://" + server.target


def open_dataset(store: Path, name: str):
    ds = logitcache.open_store(str(store)).dataset(name)
    assert ds.complete
    return ds


def entry_errors(stored: np.ndarray, exact: np.ndarray, noise: float, bound: float = BOUND) -> None:
    """The documented bounds of stored against exact log-probs, plus ``noise`` nats of engine
    difference: ``bound`` nats where p >= 1e-3, 1e-4 in probability below."""
    stored, exact = stored.astype(np.float64), exact.astype(np.float64)
    p = np.exp(exact)
    big = p >= SMALL_P
    log_err = np.abs(stored[big] - exact[big])
    assert log_err.max(initial=0) <= bound + noise, f"log error {log_err.max()}"
    prob_err = np.abs(np.exp(stored[~big]) - p[~big])
    assert prob_err.max(initial=0) <= SMALL_P_ERR + p[~big].max(initial=0) * 2 * noise


def check_targets(rec: Record, exact_targets: np.ndarray, noise: float) -> None:
    assert np.isnan(rec.target_logprobs[-1])
    got = rec.target_logprobs[:-1].astype(np.float64)
    want = exact_targets[:-1].astype(np.float64)
    assert np.abs(got - want).max(initial=0) <= BOUND + noise


# ---- top_p ---------------------------------------------------------------------------------------


def test_top_p_rows_are_the_shortest_prefix_reaching_p(store_dir, top_p_dataset, exact_rows,
                                                        sequences):  # fmt: skip
    ds = open_dataset(store_dir, top_p_dataset)
    space = ds.space
    assert (space.mode, space.k, space.codec) == (f"top_p:{TOP_P:g}", MAX_K, "topk-v5")
    assert ds.provenance["capture"] == {
        "mode": space.mode, "k": MAX_K, "codec": "topk-v5", "tool": "logitcache precompute"
    }  # fmt: skip
    assert len(ds) == len(sequences)
    off_by_one = shorter = 0
    for i, (ids, exact) in enumerate(zip(sequences, exact_rows, strict=True)):
        rec = ds[i]
        np.testing.assert_array_equal(rec.input_ids, ids)
        assert rec.counts is None and rec.tail_logprobs is not None
        n = rec.row_lengths
        assert rec.k == n.max() and n.min() >= 1 and n.max() <= MAX_K

        # n is the shortest prefix of the exact top-64 reaching P (all 64 if none does); only
        # where the mass at the shorter of the two prefixes is within quantisation of P may the
        # capture's own engine have cut one entry off.
        p = np.exp(exact.logprobs.astype(np.float64))
        covered = np.cumsum(p, axis=1)
        n_exact = np.minimum(1 + (covered < TOP_P).sum(axis=1), MAX_K)
        assert np.abs(n - n_exact).max() <= 1
        off = np.flatnonzero(n != n_exact)
        at = np.minimum(n, n_exact)[off] - 1
        assert np.all(np.abs(covered[off, at] - TOP_P) <= MASS_SLACK), (i, off)
        off_by_one += off.size
        shorter += int((n_exact < MAX_K).sum())

        # Each stored id is one of the exact row's, with its value within the bounds, and the
        # stored ids are the row's most probable ones (a near-tie may trade the last place).
        match = rec.token_ids[:, :, None] == exact.token_ids[:, None, :]  # [T, w, 64]
        real = rec.logprobs > -np.inf
        assert np.all(match.any(axis=2)[real]), f"record {i}: an id not in the exact top-64"
        rank = match.argmax(axis=2)
        exact_lp = np.take_along_axis(exact.logprobs, rank, axis=1)
        entry_errors(rec.logprobs[real], exact_lp[real], NOISE, CONTRACT_BOUND)
        for t in range(len(rec)):
            kept = set(rank[t, : n[t]].tolist())
            for q in sorted(set(range(n[t])) - kept):  # an exact top-n entry left out
                traded = exact.logprobs[t, sorted(kept - set(range(n[t])))]
                assert np.abs(traded - exact.logprobs[t, q]).min() <= NOISE, (i, t, q)

        # The tail is the exact mass outside the kept ids, within 1/128 nats in log space.
        kept_mass = np.where(real, np.take_along_axis(p, rank, axis=1), 0.0).sum(axis=1)
        tail = 1.0 - kept_mass
        clear = tail > 1e-3  # tails not swamped by the engines' fp32 difference
        err = np.abs(rec.tail_logprobs[clear].astype(np.float64) - np.log(tail[clear]))
        assert np.all(err <= BOUND + NOISE / tail[clear]), f"record {i}: tail error {err.max()}"
        assert np.all(rec.tail_logprobs[~clear] <= math.log(2e-3))
        check_targets(rec, exact.target_logprobs, NOISE)

        # From the stored numbers alone: the prefix before the last entry falls short of P and
        # the whole row reaches it (up to quantisation), and entries + tail make 1.
        stored_cum = np.cumsum(np.exp(rec.logprobs.astype(np.float64)), axis=1)
        rows = np.arange(len(rec))
        before = np.where(n > 1, stored_cum[rows, np.maximum(n - 2, 0)], 0.0)
        assert np.all(before < TOP_P + MASS_SLACK)
        full = stored_cum[rows, n - 1]
        assert np.all((full >= TOP_P - MASS_SLACK) | (n == MAX_K))
        total = full + np.exp(rec.tail_logprobs.astype(np.float64))
        assert np.all(np.abs(total - 1.0) <= 0.01)
    assert shorter > 0, "no row reached P before 64 entries: the test data is too flat"
    assert off_by_one <= 0.01 * sum(len(s) for s in sequences)


# ---- sampled -------------------------------------------------------------------------------------


def test_sampled_rows_are_draws_from_the_full_distribution(store_dir, sampled_dataset,
                                                           reference, sequences):  # fmt: skip
    ds = open_dataset(store_dir, sampled_dataset)
    space = ds.space
    assert (space.mode, space.k, space.codec) == ("sampled", SAMPLES, "sampled-v1")
    assert len(ds) == len(sequences)
    bins = np.array([1, 5, MAX_K])  # ranks 1 | 2-5 | 6-64 | beyond the top-64
    observed = np.zeros(len(bins) + 1)
    expected = np.zeros(len(bins) + 1)
    for i, ids in enumerate(sequences):
        rec = ds[i]
        np.testing.assert_array_equal(rec.input_ids, ids)
        assert rec.counts is not None and rec.tail_logprobs is None
        present = rec.counts > 0
        np.testing.assert_array_equal(rec.counts.sum(axis=1), SAMPLES)
        both = present[:, 1:] & present[:, :-1]
        assert np.all(rec.token_ids[:, 1:][both] > rec.token_ids[:, :-1][both])
        assert np.all(rec.logprobs[~present] == -np.inf) and np.all(rec.token_ids[~present] == 0)

        full = reference.full_logprobs(ids).numpy().astype(np.float64)  # [T, V]
        at_ids = np.take_along_axis(full, rec.token_ids.astype(np.int64), axis=1)
        entry_errors(rec.logprobs[present], at_ids[present], REF_NOISE)
        check_targets(rec, np.append(full[np.arange(len(ids) - 1), ids[1:]], np.nan), REF_NOISE)

        # Pool the draws by the rank of the drawn id in the full distribution.
        rank_of = np.empty_like(full, dtype=np.int64)
        order = np.argsort(-full, axis=1)
        np.put_along_axis(rank_of, order, np.arange(full.shape[1])[None, :], axis=1)
        drawn_rank = np.take_along_axis(rank_of, rec.token_ids.astype(np.int64), axis=1)
        np.add.at(observed, np.searchsorted(bins, drawn_rank[present], side="right"),
                  rec.counts[present])  # fmt: skip
        sorted_p = np.exp(np.take_along_axis(full, order, axis=1))
        edges = np.concatenate([[0], bins, [full.shape[1]]])
        cum = np.concatenate([np.zeros((len(ids), 1)), np.cumsum(sorted_p, axis=1)], axis=1)
        expected += SAMPLES * (cum[:, edges[1:]] - cum[:, edges[:-1]]).sum(axis=0)
    # The draws follow p (chi-square, 3 dof, 0.1% level: 16.27), the tail beyond the top-64
    # included: a top-k capture could never draw there.
    assert observed.sum() == SAMPLES * sum(len(s) for s in sequences)
    stat = float(((observed - expected) ** 2 / expected).sum())
    assert stat < 16.27, (observed, expected)
    if expected[-1] >= 20:
        assert observed[-1] > 0


def test_sampled_capture_is_reproducible(store_dir, sampled_dataset, demo_teacher, data_file,
                                         tmp_path, precompute_in_process):  # fmt: skip
    second = tmp_path / "second"
    precompute_in_process(*precompute_args(demo_teacher, data_file, second, sampled_dataset))
    a = logitcache.open_store(str(store_dir))
    b = logitcache.open_store(str(second))
    ds_a, ds_b = a.dataset(sampled_dataset), b.dataset(sampled_dataset)
    assert ds_a.space == ds_b.space and ds_a.keys == ds_b.keys
    for key in ds_a.keys:
        x, y = a.encoded(key), b.encoded(key)
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        assert set(x.arrays) == set(y.arrays) == {"n", "id_gaps", "counts", "logprob_q",
                                                  "target_q"}  # fmt: skip
        for name in x.arrays:
            assert x.arrays[name].dtype == y.arrays[name].dtype
            np.testing.assert_array_equal(x.arrays[name], y.arrays[name], err_msg=name)


# ---- the old codec -------------------------------------------------------------------------------


def test_old_codec_still_writes_and_reads_fixed_k_rows(store_dir, v1_dataset, exact_rows,
                                                       sequences):  # fmt: skip
    ds = open_dataset(store_dir, v1_dataset)
    space = ds.space
    assert (space.mode, space.k, space.codec) == ("topk", V1_K, "topk-q64-delta-v1")
    segments = [s for s in logitcache.open_store(str(store_dir)).segments() if s.space == space]
    assert segments
    for i, (ids, exact) in enumerate(zip(sequences, exact_rows, strict=True)):
        rec = ds[i]
        np.testing.assert_array_equal(rec.input_ids, ids)
        assert rec.token_ids.shape == (len(ids), V1_K)
        assert rec.tail_logprobs is None and rec.counts is None
        want = exact.logprobs[:, :V1_K].astype(np.float64)
        assert np.abs(rec.logprobs - want).max() <= BOUND + NOISE  # rows sorted: by position
        differ = rec.token_ids != exact.token_ids[:, :V1_K]
        for t, j in zip(*np.nonzero(differ), strict=True):  # near-ties only
            (where,) = np.nonzero(exact.token_ids[t] == rec.token_ids[t, j])
            assert where.size == 1 and abs(exact.logprobs[t, where[0]] - want[t, j]) <= NOISE
        check_targets(rec, exact.target_logprobs, NOISE)


# ---- streaming through a store-only server -------------------------------------------------------


def trimmed(rec: Record) -> Record:
    """The record without columns that are padding in every row."""
    present = rec.counts > 0 if rec.counts is not None else rec.logprobs > -np.inf
    width = int(present.sum(axis=1).max()) if len(rec) else 0

    def cut(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[:, :width]

    return Record(rec.key, rec.input_ids, cut(rec.token_ids), cut(rec.logprobs),
                  rec.target_logprobs, rec.tail_logprobs, cut(rec.counts))  # fmt: skip


def assert_same_record(got: Record, want: Record) -> None:
    assert got.key == want.key
    for name in ("input_ids", "token_ids", "logprobs", "target_logprobs", "tail_logprobs",
                 "counts"):  # fmt: skip
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype, name
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_capture_mode_streams_through_a_server_and_collates(store_server, store_dir,
                                                                   name):  # fmt: skip
    ds = open_dataset(store_dir, name)
    stream = TeacherStream(store_server, name, seed=3, batch_records=4)
    assert stream.space == ds.space and len(stream) == len(ds)
    records = list(stream)
    assert sorted(r.key for r in records) == sorted(ds.keys)
    assert [r.key for r in records] != ds.keys  # shuffled
    local = list(TeacherStream(str(store_dir), name, seed=3, batch_records=4))
    assert [r.key for r in local] == [r.key for r in records]  # the same order from the store
    for rec, loc in zip(records, local, strict=True):
        want = ds[ds.keys.index(rec.key)]
        assert_same_record(trimmed(rec), trimmed(want))
        assert_same_record(trimmed(loc), trimmed(want))

    batch = collate_records(records)
    lengths = [len(r) for r in records]
    assert batch["input_ids"].shape == (len(records), max(lengths))
    mask = batch["teacher_mask"].numpy()
    assert mask.sum() == sum(lengths)
    tail = batch["teacher_tail_logprobs"].numpy()
    assert np.all(np.isnan(tail[~mask]))
    for row, rec in enumerate(records):
        t = len(rec)
        k = rec.k
        np.testing.assert_array_equal(batch["teacher_token_ids"][row, :t, :k].numpy(),
                                      rec.token_ids)  # fmt: skip
        np.testing.assert_array_equal(batch["teacher_logprobs"][row, :t, :k].numpy(), rec.logprobs)
        if name == "topp":
            np.testing.assert_array_equal(tail[row, :t], rec.tail_logprobs)
            assert not np.isnan(tail[row, :t]).any()
        else:
            assert np.all(np.isnan(tail[row, :t]))  # no stored tail: the losses derive it
    if name == "sampled":
        counts = batch["teacher_counts"].numpy()
        assert counts.dtype == np.int64
        np.testing.assert_array_equal(counts.sum(axis=2), np.where(mask, SAMPLES, 0))
        for row, rec in enumerate(records):
            np.testing.assert_array_equal(counts[row, : len(rec), : rec.k], rec.counts)
    else:
        assert "teacher_counts" not in batch


@pytest.mark.parametrize("name", ["topp", "sampled"])
def test_streamed_records_have_the_shape_of_stored_ones(store_server, store_dir, name):
    ds = open_dataset(store_dir, name)
    for rec in TeacherStream(store_server, name, shuffle=False, batch_records=64):
        assert rec.token_ids.shape == ds[ds.keys.index(rec.key)].token_ids.shape, rec.key


def test_a_one_token_record_streams_alone_in_its_batch(store_server, store_dir, top_p_dataset):
    ds = open_dataset(store_dir, top_p_dataset)
    records = list(TeacherStream(store_server, top_p_dataset, shuffle=False, batch_records=1))
    assert [len(r) for r in records] == [len(ds[i]) for i in range(len(ds))]
    assert len(records[0]) == 1  # demo_sequences starts with a one-token sequence


def test_a_record_read_twice_from_a_loaded_segment_is_the_same(store_dir, top_p_dataset):
    store = logitcache.open_store(str(store_dir))
    key = store.dataset(top_p_dataset).keys[0]  # the one-token sequence
    location = store.locate(key)
    location.segment.load()  # as TeacherStream's store source and the server hold segments
    first = location.segment.record(location.index)
    assert len(first) == 1
    assert_same_record(location.segment.record(location.index), first)


# ---- bad flag combinations -----------------------------------------------------------------------

BAD_FLAGS = [
    (("--top-p", "0.9", "--top-k", "8"), "--max-k"),
    (("--samples", "5"), "--mode sampled"),
    (("--top-p", "1.5"), "--top-p"),
    (("--mode", "sampled", "--codec", "topk-v2"), "topk-v2"),
    (("--top-p", "0"), "--top-p"),
    (("--max-k", "8"), "--top-p"),
    (("--mode", "sampled", "--top-k", "8"), "--samples"),
    (("--mode", "sampled", "--samples", "256"), "--samples"),
    (("--mode", "sampled", "--samples", "0"), "--samples"),
    (("--top-p", "0.9", "--codec", "topk-q64-delta-v1"), "topk-q64-delta-v1"),
    (("--codec", "topk-v9"), "topk-v9"),
    (("--top-p", "0.9", "--max-k", "300"), "256"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "mentions"), BAD_FLAGS)
def test_bad_flag_combinations_fail_with_one_line_and_write_nothing(
    capsys, tmp_path, demo_teacher, data_file, flags, mentions
):
    out = tmp_path / "store"
    code = main(["precompute", "--teacher", str(demo_teacher), "--data", str(data_file),
                 "--out", str(out), "--dataset", "d", "--no-progress", *flags])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("logitcache: error: "), captured.err
    assert mentions in lines[0]
    assert captured.out == ""
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))


def test_bad_flags_exit_code_of_the_command(tmp_path, demo_teacher, data_file):
    out = tmp_path / "store"
    r = cli("precompute", "--teacher", str(demo_teacher), "--data", str(data_file), "--out",
            str(out), "--dataset", "d", "--mode", "sampled", "--codec", "topk-v2")  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "logitcache: error: codec topk-v2 does not store sampled captures"
    ]
    assert not out.exists()
