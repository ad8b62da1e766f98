"""Segments: the unit of writing. One writer fills a segment, then publishes it create-only.

A segment is a zarr group holding a batch of records of one capture space, concatenated along
positions. It is written completely by exactly one writer, then sealed create-only (see
``writer``): a no-replace rename of its staging folder, or on object storage a conditional put
of its group metadata, written last. Readers use only sealed segments, so a crash leaves at most
an unsealed folder that nobody reads, and sealed segments are never modified.

Layout of a segment group (P positions and E entries over n records):
    keys            uint8  [n, 16]  record keys, in write order
    offsets         int64  [n + 1]  record i spans positions offsets[i]:offsets[i+1]
    entry_offsets   int64  [n + 1]  and entries entry_offsets[i]:entry_offsets[i+1] (codecs
                                    with per-entry arrays only)
    input_ids       int32  [P]
    one array per field of the space's codec (logitcache.client.codecs), [P, ...] or [E]
    the codec's segment tables, if it has any (``topk-v4``: ``id_order``)
Group attributes: format, space_id, codec, records, positions, and (in newer segments)
stored_bytes, the bytes of the arrays, so that store totals never walk the store, and sealed_ns,
the time of sealing (older segments: the time their id starts with).

Arrays are written with zarr v3's sharding codec: one object per array per segment, whose inner
chunks (``CHUNK_POSITIONS`` positions, ``ENTRY_CHUNK`` entries) a reader fetches by range after
the shard's index. Older segments hold one object per chunk; zarr reads both the same way.

Per-entry arrays of ids are compressed with plain zstd (byte shuffling breaks the repeated id
runs that zstd finds); every other array with byte shuffle + zstd. This module is the layout;
``writer`` writes it and ``reader`` reads it.
"""

from __future__ import annotations

import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from logitcache.client.codecs import Field, codec_for
from logitcache.client.space import CaptureSpace

SEGMENT_FORMAT = "logitcache-segment-v1"
CHUNK_POSITIONS = 8192
ENTRY_CHUNK = 1 << 21  # entries per chunk of a per-entry array (32,768 positions at k = 64)
SHUFFLED = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
PLAIN = ZstdCodec(level=7)
INDEX_ARRAYS = ("keys", "offsets", "entry_offsets")


def shard_rows(rows: int, chunk_rows: int) -> int:
    """Rows of the one shard that holds a whole array: its rows rounded up to whole chunks."""
    return max(chunk_rows, -(-rows // chunk_rows) * chunk_rows)


def segments_dir(space_id: str) -> str:
    return f"spaces/{space_id}/segments"


def unsealed_dir(space_id: str) -> str:
    return f"spaces/{space_id}/unsealed"


def codec_fields(space: CaptureSpace) -> tuple[Field, ...]:
    return codec_for(space.codec, space.vocab_size, space.temperatures).fields


def has_entries(fields: tuple[Field, ...]) -> bool:
    """Whether a codec has per-entry arrays (then segments carry ``entry_offsets``)."""
    return any(f.per == "entry" for f in fields)


def array_names(space: CaptureSpace) -> tuple[str, ...]:
    """Every array of a segment of this space, index arrays included."""
    codec = codec_for(space.codec, space.vocab_size, space.temperatures)
    index = INDEX_ARRAYS if has_entries(codec.fields) else INDEX_ARRAYS[:2]
    return (*index, "input_ids", *(f.name for f in codec.fields), *codec.segment_tables)


def zarr_array(group: zarr.Group, name: str) -> zarr.Array:
    """An array of a segment (or dataset) group; a group there means the store is damaged."""
    member = group[name]
    if not isinstance(member, zarr.Array):
        raise ValueError(f"{name!r} in {group.store} is a group, not an array")
    return member
