"""Hugging Face datasets as precompute inputs, read as streams.

Two forms, both read with the ``datasets`` library (``pip install 'logitcache[datasets]'``):

- ``hf://NAME[/CONFIG]?split=S&revision=R&data_files=F&data_dir=D``: ``load_dataset`` with
  ``streaming=True``, so rows arrive batch by batch and the corpus is never on disk or in memory
  whole. NAME is a hub id (``owner/name``, or one word for a legacy id) or one of the packaged
  builders (``json``, ``parquet``, ``csv``, ``text``, ``arrow``) with ``data_files`` (repeatable,
  globs allowed), which is how local JSON and Parquet load through ``datasets``. Two path parts
  are ``owner/name``; CONFIG is the third (``hf://allenai/c4/en``), or ``config=`` (a one-word
  id's config: ``hf://wikitext?config=wikitext-2-raw-v1``). The split defaults to ``train``. The hub client reads ``HF_TOKEN``,
  ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` as usual.
- A directory written by ``Dataset.save_to_disk``: its Arrow shards (listed by ``load_from_disk``)
  are read one record batch at a time, and named in messages like any other shard. A saved
  ``DatasetDict`` holds one such directory per split: give the split's directory.

Rows are numbered in reading order (``hf://...:row N``, ``data-00000-of-00002.arrow:row N``). A
hub dataset streams in the order its files are listed at the revision, so pin ``revision`` for a
key list that resumes and stays the same.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

from logitcache.client.errors import (
    InvalidArgument,
    LogitCacheError,
    NotFound,
    PermissionDenied,
    Unavailable,
)

SCHEME = "hf://"
PACKAGED_BUILDERS = ("json", "parquet", "csv", "text", "arrow")
BATCH_ROWS = 1024
_QUERY_KEYS = ("split", "config", "revision", "data_files", "data_dir")
_TOKEN = "set HF_TOKEN to a token of an account that can read it"


@dataclass(frozen=True)
class HFDataset:
    """A dataset that ``datasets.load_dataset`` streams, as given by an ``hf://`` URL."""

    url: str
    name: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    data_files: tuple[str, ...] = ()
    data_dir: str | None = None

    @classmethod
    def parse(cls, url: str) -> HFDataset:
        """The dataset an ``hf://NAME[/CONFIG]?split=...`` URL names; InvalidArgument says what is
        wrong with one that names none."""
        parts = urlsplit(url)
        path = [p for p in (parts.netloc + parts.path).split("/") if p]
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - set(_QUERY_KEYS))
        if unknown:
            raise InvalidArgument(
                f"{url}: unknown parameter {unknown[0]!r} (known: {', '.join(_QUERY_KEYS)})",
                fields=["data"],
            )
        one = {k: v[-1] for k, v in query.items() if k != "data_files"}
        if not path or len(path) > 3:
            raise InvalidArgument(
                f"{url}: expected hf://NAME[/CONFIG]?split=SPLIT, NAME a hub id (owner/name) or a "
                f"packaged builder ({', '.join(PACKAGED_BUILDERS)}) with data_files=",
                fields=["data"],
            )
        single = len(path) == 1 or (len(path) == 2 and path[0] in PACKAGED_BUILDERS)
        name, config = (path[0], path[1:]) if single else ("/".join(path[:2]), path[2:])
        if config and one.get("config") not in (None, config[0]):
            raise InvalidArgument(f"{url}: the config is given twice", fields=["data"])
        data_files = tuple(f for v in query.get("data_files", []) for f in v.split(",") if f)
        if name in PACKAGED_BUILDERS and not data_files and not one.get("data_dir"):
            raise InvalidArgument(
                f"{url}: the {name} builder reads local or remote files: add data_files=PATH "
                "(repeatable, globs allowed) or data_dir=DIR",
                fields=["data"],
            )
        return cls(
            url=url,
            name=name,
            config=(config[0] if config else None) or one.get("config") or None,
            split=one.get("split") or "train",
            revision=one.get("revision") or None,
            data_files=data_files,
            data_dir=one.get("data_dir") or None,
        )

    def __str__(self) -> str:
        return self.url

    def local_files(self) -> list[Path]:
        """The local files this dataset reads (its data_files and data_dir on this machine), in
        name order: what provenance digests and what a server confines to its allowed roots."""
        found: set[Path] = set()
        for pattern in self.data_files:
            if "://" not in pattern:
                found.update(Path(p) for p in glob.glob(pattern, recursive=True))
        if self.data_dir and "://" not in self.data_dir:
            found.update(Path(self.data_dir).rglob("*"))
        return sorted(p for p in found if p.is_file())

    def describe(self) -> dict[str, Any]:
        """What provenance records about the dataset besides its local files' digests."""
        return {
            "name": self.name,
            "config": self.config,
            "split": self.split,
            "revision": self.revision,
            "data_files": list(self.data_files),
            "data_dir": self.data_dir,
        }

    def rows(self, columns: Sequence[str]) -> Iterator[dict[str, object]]:
        """The rows in stream order (see ``batch_rows``)."""
        try:
            stream = _datasets().load_dataset(
                self.name,
                self.config,
                split=self.split,
                revision=self.revision,
                data_files=list(self.data_files) or None,
                data_dir=self.data_dir,
                streaming=True,
            )
            names = stream.column_names
            if names is not None:  # known up front: read only the columns used
                present = [c for c in columns if c in names]
                if not present:
                    raise InvalidArgument(
                        f"{self.url}: needs a {' or '.join(map(repr, columns))} column, has {names}"
                    )
                stream = stream.select_columns(present)
            for batch in stream.iter(batch_size=BATCH_ROWS):
                yield from batch_rows(batch, columns)
        except (OSError, ValueError) as e:  # what datasets and the hub client raise
            raise dataset_error(self, e) from None


def batch_rows(batch: dict[str, list], columns: Sequence[str]) -> Iterator[dict[str, object]]:
    """A column batch's rows, each with those of ``columns`` it has: nulls are left out (a
    columnar file gives every row every column), unless all are null, when the first column's
    null stays for the row check to name."""
    present = [(c, batch[c]) for c in columns if c in batch]
    count = len(present[0][1]) if present else 0
    for i in range(count):
        row = {c: values[i] for c, values in present if values[i] is not None}
        yield row or {present[0][0]: None}


def is_saved_dataset(directory: Path) -> bool:
    """Whether ``directory`` was written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (directory / "dataset_dict.json").is_file() or (
        (directory / "state.json").is_file() and (directory / "dataset_info.json").is_file()
    )


def saved_dataset_shards(directory: Path) -> list[Path]:
    """The Arrow shards of a dataset saved with ``save_to_disk``, in its own order."""
    if (directory / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in directory.iterdir() if is_saved_dataset(p))
        raise InvalidArgument(
            f"{directory} is a saved DatasetDict with splits {splits}: give one split's "
            f"directory, e.g. {directory / (splits[0] if splits else 'train')}",
            fields=["data"],
        )
    try:
        saved = _datasets().load_from_disk(str(directory))
    except (OSError, ValueError) as e:
        raise InvalidArgument(
            f"{directory}: not a readable saved dataset ({_first_line(e)})", fields=["data"]
        ) from None
    return [Path(f["filename"]) for f in saved.cache_files]


def arrow_rows(stream: BinaryIO, name: str, columns: Sequence[str]) -> Iterator[dict[str, object]]:
    """The rows of one ``save_to_disk`` shard (an Arrow IPC stream), a record batch at a time."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(stream)
    except pa.ArrowInvalid as e:
        raise InvalidArgument(f"{name}: not an Arrow stream shard ({e})") from None
    present = [c for c in columns if c in reader.schema.names]
    if not present:
        raise InvalidArgument(
            f"{name}: needs a {' or '.join(map(repr, columns))} column, has {reader.schema.names}"
        )
    for batch in reader:
        yield from batch_rows({c: batch.column(c).to_pylist() for c in present}, columns)


def dataset_error(source: HFDataset, error: OSError | ValueError) -> LogitCacheError:
    """The typed error, with a one-line reason, for a failure to load or stream ``source``."""
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled

    what = f"dataset {source.url}"
    reason = _first_line(error)
    if isinstance(error, DatasetNotFoundError):
        if isinstance(error.__cause__, GatedRepoError) or "gated" in reason:
            return PermissionDenied(
                f"{what} is gated on the Hugging Face hub: accept its terms on the dataset's "
                f"page, then {_TOKEN}"
            )
        return NotFound(
            f"{what}: no such dataset or revision on the Hugging Face hub, or it is private "
            f"({_TOKEN}); a local dataset saved with save_to_disk is given as its directory"
        )
    if isinstance(error, DataFilesNotFoundError | FileNotFoundError):
        return NotFound(f"{what}: {reason}")
    if constants.HF_HUB_OFFLINE and (
        isinstance(error, ConnectionError | OfflineModeIsEnabled) or "Offline" in reason
    ):
        return Unavailable(
            f"{what} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: fetch it "
            "once with HF_HUB_OFFLINE unset, or give local files (hf://json?data_files=...) or "
            "a directory saved with save_to_disk"
        )
    if isinstance(error, ValueError):  # a bad split, config or argument
        return InvalidArgument(f"{what}: {reason}", fields=["data"])
    return Unavailable(
        f"{what}: the Hugging Face hub could not be reached ({reason}); check the network or "
        "HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use cached datasets only"
    )


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise InvalidArgument(
            "Hugging Face dataset inputs need the datasets package: "
            "pip install 'logitcache[datasets]'",
            fields=["data"],
        ) from None
    return datasets


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
