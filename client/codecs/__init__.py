"""Codecs that turn captured rows into compact integer arrays and back, found by name.

A codec is the numeric half of the storage encoding: it maps rows to small unsigned integer
arrays whose entropy is low, and the store's byte compressor (zstd) does the rest. The codec name
is part of the capture space, so a store written with one codec is always decoded with the same
one, and every codec ever shipped stays in :data:`CODECS` so old stores stay readable.

Each codec declares its arrays as :class:`Field`\\ s. A field is either per position (first
dimension P, one row per position) or per entry (one flat dimension E over all stored entries,
row after row). Arrays of several records concatenate along their first dimension, which is how
segments, wire batches and decoders handle many records at once.

One module per codec (``topk_v2``, ``topk_v3``, ``topk_v4``, ``topk_v5`` the default, ``topk_v6``,
``topk_v1``, ``sampled``); the quantisation grids they share are in ``grid``. A space with temperatures
stores per-position log tails at them beside any top-k codec's arrays (``tempered``).
"""

from __future__ import annotations

from logitcache.client.codecs.base import Codec, Field
from logitcache.client.codecs.grid import LOGPROB_SCALE, dequantize, quantize
from logitcache.client.codecs.rows import TopKRows, concat_rows
from logitcache.client.codecs.sampled import SampledCodec
from logitcache.client.codecs.tempered import TemperedCodec
from logitcache.client.codecs.topk_v1 import QuantizedTopKCodec
from logitcache.client.codecs.topk_v2 import TopKCodec
from logitcache.client.codecs.topk_v3 import ContractGridTopKCodec
from logitcache.client.codecs.topk_v4 import FrequencyOrderTopKCodec
from logitcache.client.codecs.topk_v5 import PredictedValueTopKCodec
from logitcache.client.codecs.topk_v6 import LevelSetTopKCodec

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "LOGPROB_SCALE",
    "Codec",
    "Field",
    "FrequencyOrderTopKCodec",
    "LevelSetTopKCodec",
    "PredictedValueTopKCodec",
    "QuantizedTopKCodec",
    "SampledCodec",
    "ContractGridTopKCodec",
    "TopKCodec",
    "TemperedCodec",
    "TopKRows",
    "codec_for",
    "concat_rows",
    "dequantize",
    "quantize",
]

CODECS: dict[str, type[Codec]] = {
    c.name: c
    for c in (
        QuantizedTopKCodec,
        TopKCodec,
        ContractGridTopKCodec,
        FrequencyOrderTopKCodec,
        PredictedValueTopKCodec,
        LevelSetTopKCodec,
        SampledCodec,
    )
}
DEFAULT_CODEC = PredictedValueTopKCodec.name


def codec_for(name: str, vocab_size: int, temperatures: tuple[float, ...] = ()) -> Codec:
    """The codec a capture space names (with the space's ``temperatures``, the tail arrays at
    them too); old names stay here so old stores stay readable."""
    try:
        codec = CODECS[name](vocab_size=vocab_size)
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; this version reads {sorted(CODECS)}") from None
    if not temperatures:
        return codec
    if name == SampledCodec.name:
        raise ValueError("sampled rows have no tail, so no tails at other temperatures")
    return TemperedCodec(vocab_size, codec, tuple(temperatures))
