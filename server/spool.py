"""A SubmitJob input, written to the store as it arrives instead of gathered in memory.

Rows are written as JSONL in blocks of about a megabyte, from a worker thread; texts are
tokenised in those blocks (with the teacher's tokenizer, as the job would) and stored as their
token ids, so the token limit counts actual tokens and the job does not tokenise them again.
The limit is checked block by block: an upload over it is refused mid-stream, and its partial
file removed. A finished upload is published under a hidden folder of ``jobs/`` and adopted by
the job that accepts it (:func:`adopt_upload`), or removed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from logitcache.client.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from logitcache.server.store.backend import StoreBackend, StoredObject, Upload
from logitcache.server.teachers.identity import TeacherInfo

UPLOADS = "jobs/.uploads"  # hidden: never listed as a job
INPUT_NAME = "input.jsonl"
LEFTOVER_AGE_S = 3600.0  # an upload folder this old belongs to a server that died mid-submission
_BLOCK_BYTES = 1 << 20
_BLOCK_TEXTS = 512

Tokenize = Callable[[list[str]], list[list[int]]]
Item = Sequence[int] | str  # a sequence of token ids, or a text


class JobUpload:
    """One streamed job input: ``add`` each item, then ``finish``; leaving the ``async with``
    block removes whatever was not adopted by a job."""

    def __init__(self, backend: StoreBackend, *, max_tokens: int, tokenize: Tokenize) -> None:
        self.backend = backend
        self.max_tokens = max_tokens
        self.tokenize = tokenize
        self.folder = f"{UPLOADS}/{uuid.uuid4().hex}"
        self.tokens = 0
        self.rows = 0
        self._block: list[Item] = []
        self._block_bytes = 0
        self._upload: Upload | None = None

    async def add(self, item: Item) -> None:
        if isinstance(item, str):
            if not item.strip():
                raise InvalidArgument(f"text {self.rows + len(self._block)} is empty")
            self._block_bytes += len(item)
        else:
            self.tokens += len(item)
            self._check_tokens()
            self._block_bytes += 4 * len(item)
        self._block.append(item)
        if self._block_bytes >= _BLOCK_BYTES or len(self._block) >= _BLOCK_TEXTS:
            await self._write_block()

    async def finish(self) -> StoredObject | None:
        """Write what is left and publish the upload; None if nothing was streamed."""
        await self._write_block()
        if self._upload is None:
            return None
        await asyncio.get_running_loop().run_in_executor(None, self._upload.publish)
        self._upload = None
        return StoredObject(self.backend, f"{self.folder}/{INPUT_NAME}", label="job input")

    async def __aenter__(self) -> JobUpload:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._discard)

    def _check_tokens(self) -> None:
        if self.tokens > self.max_tokens:
            raise ResourceExhausted(
                f"the job input has more than {self.max_tokens} tokens, the most one submission "
                "may stream; write it to a file the server can read and submit it with "
                "server_path",
                fields=["server_path"],
            )

    async def _write_block(self) -> None:
        if not self._block:
            return
        block, self._block, self._block_bytes = self._block, [], 0
        await asyncio.get_running_loop().run_in_executor(None, self._write, block)

    def _write(self, block: list[Item]) -> None:
        """Tokenise the block's texts, count and check, append the rows (a worker thread)."""
        texts = [item for item in block if isinstance(item, str)]
        tokenized = iter(self.tokenize(texts) if texts else [])
        rows = [next(tokenized) if isinstance(item, str) else list(item) for item in block]
        self.tokens += sum(len(ids) for item, ids in zip(block, rows, strict=True)
                           if isinstance(item, str))  # fmt: skip
        self._check_tokens()
        if self._upload is None:
            self._upload = self.backend.spool(f"{self.folder}/{INPUT_NAME}")
        self._upload.write(
            b"".join(json.dumps({"input_ids": ids}).encode() + b"\n" for ids in rows)
        )
        self.rows += len(rows)

    def _discard(self) -> None:
        if self._upload is not None:
            self._upload.abort()
            self._upload = None
        self.backend.remove_tree(self.folder)


def adopt_upload(upload: StoredObject, job_folder: str) -> str:
    """Move a finished upload into the folder of the job that accepted it (create-only);
    returns the name of the job's input there."""
    folder = upload.rel.rsplit("/", 1)[0]
    if not upload.backend.publish(folder, job_folder):
        raise FailedPrecondition(f"{job_folder} exists already in {upload.backend.url}")
    return f"{job_folder}/{INPUT_NAME}"


def remove_leftover_uploads(backend: StoreBackend) -> int:
    """Remove the uploads of servers that died mid-submission (start-up); returns how many."""
    removed = 0
    for name in backend.list_dir(UPLOADS):
        folder = f"{UPLOADS}/{name}"
        try:
            stale = time.time() - backend.modified_at(folder) > LEFTOVER_AGE_S
        except NotFound:
            continue
        if stale:
            backend.remove_tree(folder)
            removed += 1
    return removed


def teacher_tokenize(info: TeacherInfo) -> Tokenize:
    """Texts to token ids the way a job reads them (the teacher's tokenizer, special tokens
    added as the tokenizer adds them); the tokenizer is loaded once per teacher."""

    def tokenize(texts: list[str]) -> list[list[int]]:
        ids: Any = _tokenizer(str(info.path))(texts, add_special_tokens=True)["input_ids"]
        return ids

    return tokenize


def teacher_detokenize(info: TeacherInfo) -> Callable[[list[Any]], list[str]]:
    """Token sequences to the texts the teacher's tokenizer reads in them (special tokens
    left out), with the same cached tokenizer: what the sensitive-data filter screens."""

    def detokenize(sequences: list[Any]) -> list[str]:
        texts: list[str] = _tokenizer(str(info.path)).batch_decode(
            [np.asarray(ids).tolist() for ids in sequences], skip_special_tokens=True
        )
        return texts

    return detokenize


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
