"""Capture spaces and record keys.

Everything in a store lives under a capture space: the exact teacher, tokenizer and encoding that
produced it. Records from different spaces never mix, and a record's key is a hash of its space
and its token ids, so the same sequence in two datasets is stored once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from logitcache.client.tokenizer import fingerprint_tokenizer_size

KEY_BYTES = 16


class CaptureMode(StrEnum):
    """Which numbers a capture space keeps per row; the value is the stored and wire string.

    A top-p space stores its threshold in the mode string as well ("top_p:0.95"), so the stored
    mode of a space is read with `CaptureSpace.capture_mode` and `CaptureSpace.top_p`.
    """

    TOPK = "topk"  # the k most probable tokens
    TOP_P = "top_p"  # per row the shortest prefix of the top k whose probability reaches p
    SAMPLED = "sampled"  # k draws from the full distribution, as ids with counts


# Draws per position of a sampled capture that names no count (precompute's --samples, a job's or
# read-through's top_k 0): about what matches full distillation (Anshumann et al., ACL 2025).
DEFAULT_DRAWS = 12


@dataclass(frozen=True)
class CaptureSpace:
    """Everything that determines the numbers stored for a token sequence."""

    teacher_fingerprint: str
    tokenizer_fingerprint: str
    vocab_size: int
    mode: str  # a CaptureMode, with the threshold for top-p: "topk", "top_p:0.95", "sampled"
    k: int
    engine_dtype: str
    codec: str
    # Temperatures besides 1 at which each position's log tail mass is stored (sorted; see
    # ``client.codecs.tempered``). Left out of the id and the JSON when empty, so the spaces
    # and stores of earlier versions keep their ids.
    temperatures: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperatures", canonical_temperatures(self.temperatures))

    @property
    def capture_mode(self) -> CaptureMode:
        """The mode without its parameter; ValueError for a mode string this version lacks."""
        return CaptureMode(self.mode.partition(":")[0])

    @property
    def top_p(self) -> float | None:
        """The probability threshold of a top-p space, None for the other modes."""
        if self.capture_mode is not CaptureMode.TOP_P:
            return None
        return float(self.mode.partition(":")[2])

    @property
    def tokenizer_size(self) -> int | None:
        """How many ids the tokenizer produces (largest + 1); None if the fingerprint predates tok2.

        Below ``vocab_size`` for a teacher whose output layer is padded beyond its tokenizer.
        """
        return fingerprint_tokenizer_size(self.tokenizer_fingerprint)

    @property
    def space_id(self) -> str:
        """A short stable id: the hash of the canonical JSON form of the fields."""
        canonical = json.dumps(self._fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]

    def _fields(self) -> dict[str, Any]:
        """The fields as JSON values, ``temperatures`` only where there are some."""
        fields = asdict(self)
        if self.temperatures:
            fields["temperatures"] = list(self.temperatures)
        else:
            del fields["temperatures"]
        return fields

    def to_json(self) -> dict[str, Any]:
        return {"space_id": self.space_id, **self._fields()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CaptureSpace:
        fields = {k: v for k, v in obj.items() if k != "space_id"}
        fields["temperatures"] = tuple(fields.get("temperatures", ()))
        space = cls(**fields)
        if "space_id" in obj and obj["space_id"] != space.space_id:
            raise ValueError(f"capture space {obj['space_id']} does not match its own fields")
        return space


def canonical_temperatures(temperatures: Iterable[float]) -> tuple[float, ...]:
    """Temperatures as a space holds them: distinct, sorted, each the shortest decimal of its
    float32 value, so a space read from the wire (float32) has the id it was written with.
    ValueError for a temperature that is not positive and finite."""
    values = sorted({float(str(np.float32(t))) for t in temperatures})
    if any(not 0.0 < t < np.inf for t in values):
        raise ValueError(f"temperatures must be positive and finite, got {values}")
    return tuple(values)


def record_key(space_id: str, input_ids: np.ndarray) -> bytes:
    """The content address of a sequence within a capture space (16 raw bytes)."""
    raw = np.asarray(input_ids)
    if raw.size and (raw.min() < 0 or raw.max() >= 1 << 31):
        raise ValueError("token ids must be in [0, 2**31)")
    ids = np.ascontiguousarray(raw, dtype="<i4")
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"logitcache-key1")
    h.update(space_id.encode())
    h.update(ids.tobytes())
    return h.digest()
