"""Hugging Face datasets as inputs: hf:// URLs (hub ids, and local JSON/Parquet through the
packaged builders), and directories saved with save_to_disk, streamed, with bad rows named by
shard:row, and datasets that resume and stay the same."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from counting_engine import CountingEngine
from test_inputs import VOCAB_SIZE, ids_of, load

import logitcache
from logitcache.client.errors import InvalidArgument, NotFound, Unavailable
from logitcache.server.inputs import describe_input, input_shards, input_source
from logitcache.server.inputs_hf import HFDataset
from logitcache.server.precompute import PrecomputeRequest, precompute

datasets = pytest.importorskip("datasets")

ROWS = [{"text": "the cat sat"}, {"input_ids": [7, 8]}, {"text": "on the mat"}, {"input_ids": [9]}]
WANT = [[1, 2, 3], [7, 8], [4, 1, 5], [9]]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing here may reach the hub, and the datasets cache is the test's own."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def saved(path: Path, rows: list[dict], shards: int = 2) -> Path:
    """``rows`` saved with save_to_disk; a row lacks a column as None, as a dataset holds it."""
    columns = {
        "text": [r.get("text") for r in rows],
        "input_ids": [r.get("input_ids") for r in rows],
    }
    datasets.Dataset.from_dict(columns).save_to_disk(str(path), num_shards=shards)
    return path


def test_hf_urls_name_the_dataset_config_split_and_revision() -> None:
    hub = input_source("hf://allenai/c4/en?split=validation&revision=abc123")
    assert isinstance(hub, HFDataset)
    assert (hub.name, hub.config, hub.split, hub.revision) == (
        "allenai/c4",
        "en",
        "validation",
        "abc123",
    )
    legacy = HFDataset.parse("hf://wikitext?config=wikitext-2-raw-v1")  # a one-word id's config
    assert (legacy.name, legacy.config, legacy.split) == ("wikitext", "wikitext-2-raw-v1", "train")
    assert HFDataset.parse("hf://org/name").name == "org/name"  # two parts: owner/name
    files = HFDataset.parse("hf://json?data_files=a/*.jsonl&data_files=b.jsonl,c.jsonl")
    assert (files.name, files.data_files) == ("json", ("a/*.jsonl", "b.jsonl", "c.jsonl"))
    assert HFDataset.parse("hf://org/name?config=x").config == "x"
    assert input_source("corpus/*.jsonl") == Path("corpus/*.jsonl")
    with pytest.raises(InvalidArgument, match="unknown parameter 'spilt'"):
        HFDataset.parse("hf://org/name?spilt=train")
    with pytest.raises(InvalidArgument, match="add data_files=PATH"):
        HFDataset.parse("hf://parquet?split=train")
    with pytest.raises(InvalidArgument, match="expected hf://NAME"):
        HFDataset.parse("hf://a/b/c/d")


def test_a_saved_dataset_is_read_shard_by_shard_with_rows_named(tmp_path: Path) -> None:
    path = saved(tmp_path / "saved", ROWS)
    shards = input_shards(path)
    assert [p.name for p in shards] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    report = load(path)
    assert ids_of(report) == WANT
    assert [s.source for s in report.sequences] == [
        f"{shards[0]}:row 1",
        f"{shards[0]}:row 2",
        f"{shards[1]}:row 1",
        f"{shards[1]}:row 2",
    ]
    assert [s["path"] for s in describe_input(path)["shards"]] == [str(s) for s in shards]


def test_a_bad_row_of_a_saved_dataset_names_its_shard_and_row(tmp_path: Path) -> None:
    path = saved(tmp_path / "saved", [*ROWS, {"text": ""}, {"input_ids": [1, VOCAB_SIZE]}])
    last = input_shards(path)[-1]
    with pytest.raises(InvalidArgument, match=f"^{last}:row 2: empty text"):
        load(path)
    report = load(path, skip_invalid=True)
    assert ids_of(report) == WANT
    assert report.skipped == Counter({"empty text": 1, "id outside vocabulary": 1})
    no_column = tmp_path / "other"
    datasets.Dataset.from_dict({"content": ["x"]}).save_to_disk(str(no_column))
    with pytest.raises(InvalidArgument, match="needs a 'input_ids' or 'text' column"):
        load(no_column)


def test_a_saved_dataset_dict_asks_for_one_split(tmp_path: Path) -> None:
    one = datasets.Dataset.from_dict({"text": ["the cat"]})
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InvalidArgument, match=r"splits \['test', 'train'\]: give one split"):
        load(tmp_path / "dd")
    assert ids_of(load(tmp_path / "dd" / "train")) == [[1, 2]]


def test_local_json_and_parquet_stream_through_the_datasets_builders(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[2:]))
    url = f"hf://json?data_files={tmp_path}/*.jsonl&split=train"
    report = load(url)
    assert ids_of(report) == WANT
    assert report.sequences[3].source == f"{url}:row 4"
    described = describe_input(url)
    assert [s["path"] for s in described["shards"]] == [
        str(tmp_path / "a.jsonl"),
        str(tmp_path / "b.jsonl"),
    ]
    assert described["hf"]["name"] == "json" and described["sha256"]

    pq.write_table(pa.table({"text": ["the cat", "zebra", "on the mat"]}), tmp_path / "t.parquet")
    url = f"hf://parquet?data_files={tmp_path}/t.parquet"
    with pytest.raises(InvalidArgument, match="^" + re.escape(f"{url}:row 2: token id 99")):
        load(url)
    with pytest.raises(NotFound, match="none.jsonl"):
        load(f"hf://json?data_files={tmp_path}/none.jsonl")
    with pytest.raises(InvalidArgument, match="Bad split"):
        load(f"hf://json?data_files={tmp_path}/a.jsonl&split=test")


def test_a_hub_dataset_offline_is_one_line_naming_hf_hub_offline() -> None:
    with pytest.raises(Unavailable) as error:
        load("hf://someorg/not-cached-dataset?split=train")
    message = str(error.value)
    assert "hf://someorg/not-cached-dataset" in message and "HF_HUB_OFFLINE" in message
    assert "\n" not in message


def test_a_saved_dataset_precomputes_resumes_and_stays_the_same(
    demo_teacher: Path, tmp_path: Path
) -> None:
    texts = [{"text": t} for t in ["the cat sat on the mat", "a dog ran far away", "the cat"]]
    path = saved(tmp_path / "saved", texts)
    store_url = str(tmp_path / "store")

    def request() -> PrecomputeRequest:
        return PrecomputeRequest(
            teacher=str(demo_teacher),
            data=path,
            out=store_url,
            dataset="d",
            top_k=8,
            progress=False,
        )

    first = asyncio.run(precompute(request(), engine_factory=CountingEngine))
    assert (first.sequences, first.computed_sequences) == (3, 3)
    again = asyncio.run(precompute(request(), engine_factory=CountingEngine))
    assert (again.computed_sequences, again.reused_sequences) == (0, 3)
    source = logitcache.open_store(store_url).dataset("d").provenance["source"]
    assert [Path(s["path"]).name for s in source["shards"]] == [
        "data-00000-of-00002.arrow",
        "data-00001-of-00002.arrow",
    ]
