"""Reading sequences from JSONL and Parquet: order, overflow policies, errors traced to file:line."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitcache.client.errors import InvalidArgument, NotFound
from logitcache.server.inputs import InputReport, InputSource, load_sequences
from logitcache.server.store.backend import LocalBackend, StoredObject

VOCAB_SIZE = 50
MAX_LEN = 8
WORDS = {"the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5, "zebra": 99}  # "zebra" is outside


def tokenize(texts: list[str]) -> list[list[int]]:
    """A whitespace tokenizer over WORDS."""
    return [[WORDS[w] for w in text.split()] for text in texts]


def load(path: InputSource, **options: object) -> InputReport:
    kwargs: dict = {"vocab_size": VOCAB_SIZE, "max_len": MAX_LEN, "tokenize": tokenize}
    return load_sequences(path, **{**kwargs, **options})


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def ids_of(report: InputReport) -> list[list[int]]:
    return [s.input_ids.tolist() for s in report.sequences]


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    return tmp_path / "data.jsonl"


def test_text_and_id_rows_keep_line_order(jsonl: Path) -> None:
    write_lines(
        jsonl,
        [
            '{"text": "the cat sat"}',
            '{"input_ids": [7, 8]}',
            "",
            "   ",
            '{"text": "on  the\\tmat"}',
            '{"input_ids": [0], "extra": "ignored"}',
            '{"input_ids": [49, 48, 47, 46, 45, 44, 43, 42]}',  # exactly MAX_LEN
        ],
    )
    report = load(jsonl)

    assert ids_of(report) == [[1, 2, 3], [7, 8], [4, 1, 5], [0], [49, 48, 47, 46, 45, 44, 43, 42]]
    assert [s.source for s in report.sequences] == [f"{jsonl}:{n}" for n in (1, 2, 5, 6, 7)]
    assert all(s.input_ids.dtype == np.int32 for s in report.sequences)
    assert report.skipped == Counter()
    assert (report.truncated, report.split) == (0, 0)


# (bad line, the category it is skipped under, a fragment of the message)
BAD_ROWS = [
    pytest.param('{"text": "the cat"', "malformed JSON", "malformed JSON", id="truncated-json"),
    pytest.param("{'text': 'cat'}", "malformed JSON", "malformed JSON", id="single-quotes"),
    pytest.param("[1, 2, 3]", "not an object", "JSON object", id="array-row"),
    pytest.param('"the cat"', "not an object", "JSON object", id="string-row"),
    pytest.param("7", "not an object", "JSON object", id="number-row"),
    pytest.param('{"txt": "the cat"}', "missing field", "missing field", id="missing-field"),
    pytest.param('{"text": ""}', "empty text", "empty text", id="empty-text"),
    pytest.param('{"text": " \\n\\t "}', "empty text", "empty text", id="blank-text"),
    pytest.param('{"text": 5}', "bad text", "must be a string", id="text-not-string"),
    pytest.param('{"input_ids": "1 2"}', "bad input_ids", "list of integers", id="ids-string"),
    pytest.param('{"input_ids": []}', "bad input_ids", "non-empty", id="ids-empty"),
    pytest.param('{"input_ids": 3}', "bad input_ids", "list of integers", id="ids-scalar"),
    pytest.param('{"input_ids": [1, 2.5]}', "bad input_ids", "list of integers", id="ids-float"),
    pytest.param('{"input_ids": [1, "2"]}', "bad input_ids", "list of integers", id="ids-str"),
    pytest.param('{"input_ids": [1, null]}', "bad input_ids", "list of integers", id="ids-null"),
    pytest.param('{"input_ids": [true]}', "bad input_ids", "list of integers", id="ids-bool"),
    pytest.param('{"input_ids": [[1, 2]]}', "bad input_ids", "list of integers", id="ids-nested"),
    pytest.param('{"input_ids": [[1], [2, 3]]}', "bad input_ids", "list of integers", id="ragged"),
    pytest.param('{"input_ids": [3, -1]}', "id outside vocabulary", "-1 at index 1", id="id-neg"),
    pytest.param('{"input_ids": [50]}', "id outside vocabulary", "[0, 50)", id="id-too-big"),
    pytest.param('{"text": "the zebra"}', "id outside vocabulary", "99", id="text-id-too-big"),
    pytest.param(
        '{"input_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9]}', "too long", "exceeds", id="too-long-ids"
    ),
    pytest.param(
        '{"text": "the cat sat on the mat the cat sat"}', "too long", "9 tokens", id="too-long-text"
    ),
]


def file_with_bad_line_3(path: Path, bad: str) -> Path:
    return write_lines(path, ['{"input_ids": [1, 2]}', "", bad, '{"text": "the mat"}'])


@pytest.mark.parametrize(("bad", "category", "fragment"), BAD_ROWS)
def test_bad_row_names_file_and_line(jsonl: Path, bad: str, category: str, fragment: str) -> None:
    file_with_bad_line_3(jsonl, bad)
    with pytest.raises(InvalidArgument) as excinfo:
        load(jsonl)
    message = str(excinfo.value)
    assert message.startswith(f"{jsonl}:3: ")
    assert fragment in message


@pytest.mark.parametrize(("bad", "category", "fragment"), BAD_ROWS)
def test_bad_row_is_skipped_and_counted(
    jsonl: Path, bad: str, category: str, fragment: str
) -> None:
    file_with_bad_line_3(jsonl, bad)
    report = load(jsonl, skip_invalid=True)

    assert ids_of(report) == [[1, 2], [1, 5]]
    assert report.skipped == Counter({category: 1})


def test_skipped_rows_are_counted_by_category(jsonl: Path) -> None:
    write_lines(
        jsonl,
        [
            "{oops",
            '{"text": "the cat"}',
            "{nope",
            '{"input_ids": [50]}',
            '{"input_ids": [-3]}',
            '{"text": ""}',
            '{"input_ids": []}',
            '{"input_ids": [1, 1, 1, 1, 1, 1, 1, 1, 1]}',
            "[]",
        ],
    )
    report = load(jsonl, skip_invalid=True)

    assert ids_of(report) == [[1, 2]]
    assert report.skipped == Counter(
        {
            "malformed JSON": 2,
            "id outside vocabulary": 2,
            "empty text": 1,
            "bad input_ids": 1,
            "too long": 1,
            "not an object": 1,
        }
    )


def test_invalid_utf8_names_file_and_line(jsonl: Path) -> None:
    jsonl.write_bytes(b'{"input_ids": [1]}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InvalidArgument, match=f"^{jsonl}:2: "):
        load(jsonl)


def test_overflow_truncate(jsonl: Path) -> None:
    long = list(range(20))
    write_lines(jsonl, [f'{{"input_ids": {long}}}', '{"input_ids": [1, 2]}'])
    report = load(jsonl, overflow="truncate")

    assert ids_of(report) == [long[:MAX_LEN], [1, 2]]
    assert report.truncated == 1
    assert report.split == 0


def test_overflow_split(jsonl: Path) -> None:
    long, exact_multiple = list(range(20)), list(range(30, 46))
    write_lines(
        jsonl,
        [
            f'{{"input_ids": {long}}}',
            '{"input_ids": [1, 2]}',
            f'{{"input_ids": {exact_multiple}}}',
            '{"text": "the cat sat on the mat the cat sat"}',
        ],
    )
    report = load(jsonl, overflow="split")

    assert ids_of(report) == [
        long[0:8],
        long[8:16],
        long[16:20],
        [1, 2],
        exact_multiple[0:8],
        exact_multiple[8:16],
        [1, 2, 3, 4, 1, 5, 1, 2],
        [3],
    ]
    assert [s.source.rsplit(":", 1)[1] for s in report.sequences] == list("11123344")
    assert report.split == 3
    assert report.truncated == 0


def test_unknown_overflow_policy(jsonl: Path) -> None:
    write_lines(jsonl, ['{"input_ids": [1]}'])
    with pytest.raises(InvalidArgument, match="overflow"):
        load(jsonl, overflow="drop")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        load(tmp_path / "absent.jsonl")


@pytest.mark.parametrize(
    "lines",
    [
        pytest.param([], id="empty-file"),
        pytest.param(["", "  "], id="blank-lines"),
        pytest.param(['{"text": ""}', "{bad"], id="all-rows-bad"),
    ],
)
def test_no_usable_rows(jsonl: Path, lines: list[str]) -> None:
    write_lines(jsonl, lines)
    with pytest.raises(InvalidArgument, match="no usable sequences"):
        load(jsonl, skip_invalid=True)


# -- Parquet ---------------------------------------------------------------------------------------


def write_parquet(path: Path, columns: dict[str, pa.Array]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_text_column(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "data.parquet",
        {"text": pa.array(["the cat", "sat on the mat"]), "meta": pa.array([1, 2])},
    )
    report = load(path)

    assert ids_of(report) == [[1, 2], [3, 4, 1, 5]]
    assert [s.source for s in report.sequences] == [f"{path}:row 1", f"{path}:row 2"]


def test_parquet_input_ids_column(tmp_path: Path) -> None:
    ids = pa.array([[5, 6, 7], [0], list(range(12))], type=pa.list_(pa.int64()))
    path = write_parquet(tmp_path / "data.parquet", {"input_ids": ids})
    report = load(path, overflow="split")

    assert ids_of(report) == [[5, 6, 7], [0], list(range(8)), list(range(8, 12))]


def test_parquet_bad_row_names_row(tmp_path: Path) -> None:
    ids = pa.array([[5], [1, VOCAB_SIZE]], type=pa.list_(pa.int32()))
    path = write_parquet(tmp_path / "data.parquet", {"input_ids": ids})
    with pytest.raises(InvalidArgument, match=f"^{path}:row 2: token id {VOCAB_SIZE}"):
        load(path)


def test_parquet_without_a_usable_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "data.parquet", {"content": pa.array(["the cat"])})
    with pytest.raises(InvalidArgument, match="'text' or 'input_ids'"):
        load(path)


def test_damaged_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InvalidArgument, match="not a readable Parquet file"):
        load(path)


# -- other sources: a binary stream, an object in a store --------------------------------------


def test_a_stream_and_a_store_object_read_like_the_file(jsonl: Path, tmp_path: Path) -> None:
    lines = ['{"text": "the cat sat"}', '{"input_ids": [7, 8]}', '{"text": "on the mat"}']
    want = ids_of(load(write_lines(jsonl, lines)))
    with open(jsonl, "rb") as stream:
        assert ids_of(load(stream)) == want
    backend = LocalBackend(tmp_path)
    backend.write_bytes("jobs/j1/input.jsonl", jsonl.read_bytes())
    stored = StoredObject(backend, "jobs/j1/input.jsonl")
    report = load(stored)
    assert ids_of(report) == want
    assert report.sequences[1].source == f"{tmp_path}/jobs/j1/input.jsonl:2"


def test_a_bad_row_of_a_store_object_names_the_object_and_line(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    backend.write_bytes("jobs/j1/input.jsonl", b'{"input_ids": [1]}\n{bad\n')
    with pytest.raises(InvalidArgument, match=r"jobs/j1/input.jsonl:2: malformed JSON"):
        load(StoredObject(backend, "jobs/j1/input.jsonl"))
    with pytest.raises(NotFound):
        load(StoredObject(backend, "jobs/j2/input.jsonl"))


def test_parquet_from_a_store_object(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "data.parquet", {"text": pa.array(["the cat"])})
    backend = LocalBackend(tmp_path)
    assert ids_of(load(StoredObject(backend, "data.parquet"))) == [[1, 2]]
    assert ids_of(load(path)) == [[1, 2]]
