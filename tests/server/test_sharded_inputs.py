"""Sharded and streamed inputs: directories and globs of JSONL/Parquet shards read in name order,
bad rows traced to shard:line or shard:row, the chosen columns, bounded reads, and a sharded
dataset that resumes and stays the same whatever the shard set is called."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from counting_engine import CountingEngine
from test_inputs import VOCAB_SIZE, load, tokenize

import logitcache
from logitcache.client.errors import AlreadyExists, InvalidArgument, NotFound
from logitcache.server import inputs
from logitcache.server.inputs import (
    InputReport,
    InputSource,
    describe_input,
    input_shards,
)
from logitcache.server.precompute import PrecomputeRequest, precompute


def ids_of(report: InputReport) -> list[list[int]]:
    return [s.input_ids.tolist() for s in report.sequences]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, pa.Array]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """A directory of shards, written out of name order, with files that are not shards."""
    root = tmp_path / "corpus"
    write_jsonl(root / "part-002.jsonl", [{"text": "on the mat"}])
    write_parquet(
        root / "part-000.parquet",
        {"input_ids": pa.array([[7, 8], [9]], type=pa.list_(pa.int64()))},
    )
    write_jsonl(root / "sub" / "part-003.jsonl", [{"input_ids": [11]}])
    write_jsonl(root / "part-001.jsonl", [{"text": "the cat"}, {"input_ids": [10]}])
    (root / "_SUCCESS").write_text("")
    write_jsonl(root / ".hidden.jsonl", [{"text": "zebra"}])
    write_jsonl(root / "_tmp" / "part-009.jsonl", [{"text": "zebra"}])
    (root / "README.txt").write_text("not a shard")
    return root


def test_a_directory_reads_its_shards_in_name_order(shards: Path) -> None:
    report = load(shards)

    assert ids_of(report) == [[7, 8], [9], [1, 2], [10], [4, 1, 5], [11]]
    assert [s.source for s in report.sequences] == [
        f"{shards}/part-000.parquet:row 1",
        f"{shards}/part-000.parquet:row 2",
        f"{shards}/part-001.jsonl:1",
        f"{shards}/part-001.jsonl:2",
        f"{shards}/part-002.jsonl:1",
        f"{shards}/sub/part-003.jsonl:1",
    ]


def test_a_glob_reads_its_matches_in_name_order(shards: Path) -> None:
    assert ids_of(load(f"{shards}/part-*.jsonl")) == [[1, 2], [10], [4, 1, 5]]
    assert ids_of(load(shards / "**" / "part-00[03]*")) == [[7, 8], [9], [11]]
    with pytest.raises(InvalidArgument, match=f"^{shards}/README.txt:1: malformed JSON"):
        load(f"{shards}/*")  # a glob is explicit: every file it matches is read


def test_an_input_with_no_shards_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound, match="no .jsonl or .parquet shards"):
        load(tmp_path / "empty")
    with pytest.raises(NotFound, match="no input file matches"):
        load(f"{tmp_path}/*.jsonl")
    with pytest.raises(NotFound, match="does not exist"):
        load(tmp_path / "absent.jsonl")


def test_a_bad_row_in_a_later_shard_names_the_shard_and_line(shards: Path) -> None:
    write_jsonl(shards / "part-004.jsonl", [{"input_ids": [1]}, {"text": "the zebra"}])
    with pytest.raises(InvalidArgument, match=f"^{shards}/part-004.jsonl:2: token id 99"):
        load(shards)
    (shards / "part-005.jsonl").write_text('{"input_ids": [1]}\n\n{oops\n')
    with pytest.raises(InvalidArgument, match=f"^{shards}/part-005.jsonl:3: malformed JSON"):
        load(f"{shards}/part-005*")


def test_a_bad_parquet_row_names_the_shard_and_row(shards: Path) -> None:
    write_parquet(
        shards / "part-004.parquet",
        {"input_ids": pa.array([[1], [2], [3, VOCAB_SIZE]], type=pa.list_(pa.int32()))},
    )
    with pytest.raises(InvalidArgument, match=f"^{shards}/part-004.parquet:row 3: token id 50"):
        load(shards)
    write_parquet(shards / "part-005.parquet", {"content": pa.array(["the cat"])})
    with pytest.raises(InvalidArgument, match="part-005.parquet: needs a 'text' or 'input_ids'"):
        load(f"{shards}/part-005.parquet")


def test_skipped_rows_are_counted_across_shards(shards: Path) -> None:
    write_jsonl(shards / "part-004.jsonl", [{"text": ""}, {"input_ids": [VOCAB_SIZE]}])
    write_parquet(shards / "part-005.parquet", {"text": pa.array(["the cat", "zebra", None])})
    report = load(shards, skip_invalid=True)

    assert ids_of(report) == [[7, 8], [9], [1, 2], [10], [4, 1, 5], [1, 2], [11]]  # sub/ last
    assert report.skipped == Counter({"empty text": 1, "id outside vocabulary": 2, "bad text": 1})


def test_the_first_bad_row_is_reported_whatever_its_kind(tmp_path: Path) -> None:
    """A token check on line 1 comes before a parse error on line 3 (rows are checked in order,
    not all parse errors first)."""
    path = tmp_path / "data.jsonl"
    path.write_text('{"input_ids": [50]}\n{"text": "the cat"}\n{oops\n')
    with pytest.raises(InvalidArgument, match=f"^{path}:1: token id 50"):
        load(path)


def test_rows_are_checked_in_blocks_and_keep_their_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inputs, "BLOCK_ROWS", 4)
    rows: list[object] = [{"text": "the cat"} if n % 3 else {"input_ids": [n]} for n in range(11)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_parquet(tmp_path / "b.parquet", {"text": pa.array(["on the mat"] * 6)})
    calls: list[int] = []

    def counting(texts: list[str]) -> list[list[int]]:
        calls.append(len(texts))
        return tokenize(texts)

    report = load(tmp_path, tokenize=counting)

    want = [[1, 2] if n % 3 else [n] for n in range(11)] + [[4, 1, 5]] * 6
    assert ids_of(report) == want
    assert max(calls) <= 4 and sum(calls) == 7 + 6  # every text once, at most a block at a time


class CountingRaw(io.RawIOBase):
    """A raw stream over bytes that counts what it has handed out."""

    def __init__(self, data: bytes) -> None:
        self.data, self.delivered = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self.data[self.delivered : self.delivered + len(buffer)]
        buffer[: len(chunk)] = chunk
        self.delivered += len(chunk)
        return len(chunk)


def test_a_large_jsonl_input_is_read_as_a_stream() -> None:
    """The first block is checked after about 4 MiB of a 12 MiB input were read, not all of it."""
    line = json.dumps({"text": " ".join(["the cat sat on the mat"] * 50)}) + "\n"
    raw = CountingRaw(line.encode() * (12 * (1 << 20) // len(line)))
    seen: list[int] = []

    def watching(texts: list[str]) -> list[list[int]]:
        seen.append(raw.delivered)
        return tokenize(texts)

    report = load(io.BufferedReader(raw), tokenize=watching, overflow="truncate")

    assert len(report.sequences) == len(raw.data) // len(line)
    assert seen[0] <= (1 << 22) + (1 << 16) < len(raw.data) // 2
    assert seen == sorted(seen) and len(seen) > 2


def test_text_and_ids_fields_choose_the_columns(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [{"body": "the cat", "text": "zebra"}, {"tokens": [3, 4], "body": "zebra"}, {"x": 1}],
    )
    options = {"text_field": "body", "ids_field": "tokens"}
    with pytest.raises(InvalidArgument, match=f"^{path}:3: missing field 'body' or 'tokens'"):
        load(path, **options)
    report = load(path, skip_invalid=True, **options)
    assert ids_of(report) == [[1, 2], [3, 4]]

    parquet = write_parquet(tmp_path / "data.parquet", {"body": pa.array(["on the mat"])})
    assert ids_of(load(parquet, text_field="body")) == [[4, 1, 5]]
    with pytest.raises(InvalidArgument, match="needs a 'text' or 'input_ids' column"):
        load(parquet)


def test_describe_input_lists_each_shard_with_its_size_and_sha256(shards: Path) -> None:
    described = describe_input(shards)
    files = [Path(str(s)) for s in input_shards(shards)]

    assert described["path"] == str(shards)
    assert described["shards"] == [
        {
            "path": str(f),
            "size": f.stat().st_size,
            "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
        }
        for f in files
    ]
    single = describe_input(files[0])
    assert single["sha256"] == described["shards"][0]["sha256"]  # one file: its own digest
    moved = shards.rename(shards.with_name("moved"))
    assert describe_input(moved)["sha256"] == described["sha256"]  # content, not names
    write_jsonl(moved / "part-004.jsonl", [{"input_ids": [1]}])
    assert describe_input(moved)["sha256"] != described["sha256"]


def test_a_sharded_dataset_resumes_under_any_name_of_its_shard_set(
    demo_teacher: Path, tmp_path: Path
) -> None:
    """The key list depends on the shards' content and name order, so the same shards given as
    a directory and then as a glob continue one dataset, computing nothing twice."""
    root = tmp_path / "corpus"
    write_jsonl(root / "b.jsonl", [{"text": "a dog ran far away"}, {"text": "the cat sat"}])
    write_jsonl(root / "a.jsonl", [{"text": "the cat sat on the mat"}])
    store_url = str(tmp_path / "store")
    engines: list[CountingEngine] = []

    def factory(info, options) -> CountingEngine:  # type: ignore[no-untyped-def]
        engines.append(CountingEngine(info, options))
        return engines[-1]

    def request(data: InputSource) -> PrecomputeRequest:
        return PrecomputeRequest(
            teacher=str(demo_teacher),
            data=data,
            out=store_url,
            dataset="d",
            top_k=8,
            progress=False,
        )

    first = asyncio.run(precompute(request(root), engine_factory=factory))
    assert (first.sequences, first.computed_sequences) == (3, 3)
    ds = logitcache.open_store(store_url).dataset("d")
    source = ds.provenance["source"]
    assert [s["path"] for s in source["shards"]] == [str(root / "a.jsonl"), str(root / "b.jsonl")]
    assert (source["text_field"], source["ids_field"]) == ("text", "input_ids")

    again = asyncio.run(precompute(request(f"{root}/*.jsonl"), engine_factory=factory))
    assert (again.computed_sequences, again.reused_sequences) == (0, 3)
    assert len(engines) == 1  # complete: no engine started

    write_jsonl(root / "c.jsonl", [{"text": "more"}])
    with pytest.raises(AlreadyExists, match="different sequences"):
        asyncio.run(precompute(request(root), engine_factory=factory))


def test_checked_sequences_are_spooled_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token ids leave memory every SPOOL_TOKENS tokens and come back as read-only views of the
    spool, in order, with their sources; the spool file is unlinked (nothing left in TMPDIR)."""
    spool_dir = tmp_path / "tmp"
    spool_dir.mkdir()
    monkeypatch.setattr(inputs, "SPOOL_TOKENS", 5)
    monkeypatch.setattr(inputs.tempfile, "tempdir", str(spool_dir))
    rows = [{"input_ids": list(range(n % 7 + 1))} for n in range(30)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    report = load(path, overflow="split", max_len=4)

    want = []
    for n in range(30):
        ids = list(range(n % 7 + 1))
        want += [ids[i : i + 4] for i in range(0, len(ids), 4)]
    assert ids_of(report) == want
    assert report.sequences[-1].source == f"{path}:30"
    assert report.sequences[-1].input_ids.tolist() == want[-1]
    assert not report.sequences[0].input_ids.flags.writeable
    assert list(spool_dir.iterdir()) == []
    with pytest.raises(IndexError):
        report.sequences[len(want)]


def test_precompute_command_takes_the_field_flags() -> None:
    from logitcache.cli import build_parser

    base = ["precompute", "--teacher", "t", "--data", "corpus/*.parquet", "--out", "s"]
    base += ["--dataset", "d", "--top-k", "8"]
    parser = build_parser()
    defaults = parser.parse_args(base)
    assert (defaults.text_field, defaults.ids_field) == ("text", "input_ids")
    chosen = parser.parse_args([*base, "--text-field", "body", "--ids-field", "tokens"])
    assert (chosen.text_field, chosen.ids_field) == ("body", "tokens")
    assert str(chosen.data) == "corpus/*.parquet"
