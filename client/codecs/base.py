"""What every codec shares: its fields, the vocabulary that fixes its id dtype, and the checks
and reshapes between padded [P, k] rows and the flat entries of ragged ones."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from logitcache.client.codecs.rows import TopKRows


@dataclass(frozen=True)
class Field:
    """One encoded array: its dtype, whether it runs over positions or entries, and a hint for
    the byte compressor (byte shuffling helps small integers, hurts id sequences)."""

    name: str
    dtype: np.dtype
    per: Literal["position", "entry"]
    shuffle: bool = True
    per_k: bool = False  # a per-position array of k columns ([P, k]; the fixed-k codec's)


@dataclass(frozen=True)
class Codec(ABC):
    """A codec for one vocabulary size, which fixes the id dtype; its name is its registry key
    and is stored in the capture space, so it never changes meaning."""

    name: ClassVar[str]
    vocab_size: int
    # Arrays a sealed segment stores beside the fields, for the whole segment (``topk-v4``'s
    # frequency order); written by :meth:`seal`, given back to :meth:`unseal`.
    segment_tables: ClassVar[tuple[str, ...]] = ()

    @property
    def id_dtype(self) -> np.dtype:
        """The narrowest unsigned type that holds every id of the vocabulary."""
        return np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.uint32)

    @property
    @abstractmethod
    def fields(self) -> tuple[Field, ...]:
        """The arrays of an encoding, in storage order."""

    @abstractmethod
    def encode(self, rows: TopKRows) -> dict[str, np.ndarray]:
        """Rows -> one array per field; ValueError for rows this codec cannot store."""

    @abstractmethod
    def decode(self, arrays: dict[str, np.ndarray]) -> TopKRows:
        """One array per field (of one or several concatenated encodings) -> rows."""

    def seal(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The arrays a segment stores for the concatenated encodings of its records (with their
        ``input_ids``), its :attr:`segment_tables` included: the encodings themselves unless a
        codec models a whole segment."""
        return arrays

    def decoding_tables(self, tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A segment's :attr:`segment_tables` as :meth:`unseal` reads them. A reader calls this
        once per segment and hands the result to every unseal of it, so a codec whose tables
        need work before decoding (sorting lists back) does that work once."""
        return tables

    def unseal(
        self, arrays: dict[str, np.ndarray], tables: dict[str, np.ndarray], input_ids: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Arrays read from a sealed segment (whole, or one record's slice, whose input tokens
        are ``input_ids``) -> the encoding :meth:`decode` and the wire take; ``tables`` are the
        segment's :attr:`segment_tables`, or what :meth:`decoding_tables` made of them."""
        return arrays

    def check_ids(self, token_ids: np.ndarray, valid: np.ndarray) -> None:
        """ValueError unless every id where ``valid`` is inside the vocabulary."""
        ids = token_ids[valid]
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id outside the vocabulary of size {self.vocab_size}")


def row_lengths(valid: np.ndarray) -> np.ndarray:
    """Entries per row of a [P, k] mask whose True entries must form a prefix of each row."""
    n: np.ndarray = valid.sum(axis=1)
    if not np.array_equal(valid, np.arange(valid.shape[1]) < n[:, None]):
        raise ValueError("padding (log-prob -inf) must come after every stored entry of a row")
    return n


def stored_row_lengths(arrays: dict[str, np.ndarray], entry_field: str) -> np.ndarray:
    """The ``n`` array of a ragged encoding, checked against the length of its entries."""
    n = np.asarray(arrays["n"]).astype(np.int64)
    if int(n.sum()) != np.asarray(arrays[entry_field]).shape[0]:
        raise ValueError("malformed encoding: row lengths do not add up to the entries")
    return n


def pad_rows(flat: np.ndarray, n: np.ndarray, fill: float, dtype: type[np.generic]) -> np.ndarray:
    """Entries E -> [P, max n], rows filled in order, the rest ``fill``."""
    width = int(n.max()) if n.size else 0
    if n.size and (n == width).all():
        return flat.reshape(n.shape[0], width).astype(dtype, copy=False)
    out = np.full((n.shape[0], width), fill, dtype=dtype)
    out[np.arange(width) < n[:, None]] = flat
    return out
