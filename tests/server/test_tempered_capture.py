"""Tails at other temperatures, end to end: ``logitcache precompute --temperatures`` on the
reference engine stores them (equal to the dense computation within the grid's 1/128 nats), they
reach the trainer through the store, the wire and the collator, and the tempered loss from such a
batch is the dense tempered divergence at k = V. Spaces without temperatures keep their old ids,
and the records of old stores come back without tails."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import logitcache
from logitcache.client.errors import FailedPrecondition
from logitcache.client.record import Record
from logitcache.client.space import CaptureSpace
from logitcache.client.wire import decode_batch
from logitcache.server.engine.reference import ReferenceEngine, TransformersReference
from logitcache.server.grpc.convert import dataset_info, stream_batch
from logitcache.server.store.cache import SegmentCache
from logitcache.server.store.store import open_store
from logitcache.server.store.summary import store_summary
from logitcache.server.streaming import DatasetStreamer, StreamRequest
from logitcache.trainer.collate import Collator
from logitcache.trainer.losses import DIVERGENCES
from logitcache.trainer.tempered import tempered_batch_loss

TINY_V = 64  # a teacher small enough to capture all of its vocabulary (k <= 256)
GRID = 1 / 128 + 1e-4  # the tail grid's bound (1/64-nat steps), plus float32 slack
OLD_STORE = Path(__file__).resolve().parents[1] / "data" / "store-v1"


def precompute(teacher: Path, rows: list[dict], out: Path, *flags: str) -> None:
    from logitcache.cli import build_parser
    from logitcache.cli.precompute import precompute_command

    data = out.parent / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["precompute", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--dataset", "d", "--no-progress", *flags]  # fmt: skip
    assert precompute_command(build_parser().parse_args(argv), ReferenceEngine) == 0


def dense_log_tails(full_logprobs: np.ndarray, record: Record, t: float) -> np.ndarray:
    """log of the mass outside the record's entries under softmax(lp / t) over the whole
    vocabulary."""
    scaled = full_logprobs.astype(np.float64) / t
    scaled -= np.logaddexp.reduce(scaled, axis=1, keepdims=True)
    kept = np.zeros_like(scaled, dtype=bool)
    ids = record.token_ids.astype(np.int64)
    np.put_along_axis(kept, ids, np.isfinite(record.logprobs), axis=1)
    outside = ~kept
    with np.errstate(divide="ignore"):
        return np.logaddexp.reduce(np.where(outside, scaled, -np.inf), axis=1)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama with a word-level tokenizer of TINY_V ids, saved as a teacher checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-teacher")
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, TINY_V)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_V, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    return path


@pytest.mark.parametrize("capture", [["--top-k", "8"], ["--top-p", "0.9", "--max-k", "16"]])
def test_precompute_stores_the_dense_tails(
    demo_teacher: Path, tmp_path: Path, capture: list[str]
) -> None:
    """Top-k, and top-p (the tail is what each row's prefix leaves out, at T as at 1)."""
    out = tmp_path / "store"
    texts = ["the cat sat on the mat", "a dog ran far away in the park"]
    precompute(demo_teacher, [{"text": t} for t in texts], out, *capture, "--temperatures", "2")
    ds = logitcache.open_store(str(out)).dataset("d")
    assert ds.space.temperatures == (2.0,)
    assert ds.space.to_json()["temperatures"] == [2.0]
    described = dataset_info(store_summary(open_store(str(out)), "d")["datasets"][0]).space
    on_wire = {f: getattr(described, f) for f in CaptureSpace.__dataclass_fields__}
    assert list(described.temperatures) == [2.0] and CaptureSpace(**on_wire) == ds.space
    reference = TransformersReference(demo_teacher)
    for record in ds:
        assert record.temperatures == (2.0,) and record.tempered_log_tails is not None
        assert record.tempered_log_tails.shape == (len(record), 1)
        want = dense_log_tails(reference.full_logprobs(record.input_ids).numpy(), record, 2.0)
        np.testing.assert_allclose(record.tempered_log_tails[:, 0], want, atol=GRID, rtol=0)


def stream_records(store_url: str) -> list[Record]:
    """The dataset as a client of the service decodes it (server stream, then the wire)."""

    async def run() -> list:
        streamer = DatasetStreamer(open_store(store_url), SegmentCache(1 << 24), prefetch=2)
        try:
            return [b async for b in streamer.stream(StreamRequest(dataset="d", shuffle=False))]
        finally:
            streamer.close()

    return [r for batch in asyncio.run(run()) for r in decode_batch(stream_batch(batch))]


def test_tempered_loss_of_a_streamed_batch_is_dense_at_full_vocabulary(
    tiny_teacher: Path, tmp_path: Path
) -> None:
    out = tmp_path / "store"
    rng = np.random.default_rng(1)
    rows = [{"input_ids": rng.integers(1, TINY_V, n).tolist()} for n in (9, 14, 5)]
    precompute(tiny_teacher, rows, out, "--top-k", str(TINY_V), "--temperatures", "4,2")
    records = stream_records(str(out))
    assert [r.temperatures for r in records] == [(2.0, 4.0)] * 3
    batch = Collator()(records)
    assert batch["teacher_tempered_log_tails"].shape == (3, 14, 2)
    assert batch["teacher_temperatures"].tolist() == [2.0, 4.0]

    reference = TransformersReference(tiny_teacher)
    mask = batch["teacher_mask"]
    teacher = torch.zeros(3, 14, TINY_V)
    for i, r in enumerate(records):
        teacher[i, : len(r)] = reference.full_logprobs(r.input_ids)
    student = torch.randn(3, 14, TINY_V, generator=torch.Generator().manual_seed(2)) * 2
    for t in (2.0, 4.0):
        for kind in ("forward_kl", "reverse_kl"):
            got = tempered_batch_loss(student, batch, t, kind=kind)
            p = torch.log_softmax(teacher[mask].double() / t, -1)
            q = torch.log_softmax(student[mask].double() / t, -1)
            want = DIVERGENCES[kind](p, q, 0.5).mean() * t**2
            # Within what the rounding of the stored log-probs (0.01 nats) moves the divergence.
            torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=0)
    with pytest.raises(FailedPrecondition, match="temperature 3 was not captured"):
        tempered_batch_loss(student, batch, 3.0)
    assert torch.isfinite(tempered_batch_loss(student, batch, 3.0, approximate=True))


def test_a_space_without_temperatures_keeps_its_id_and_old_stores_read() -> None:
    fields = ("teacher-fp", "tok-fp", 1785, "topk", 8, "float32", "topk-v2")
    space = CaptureSpace(*fields)
    assert space.space_id == "b09d9d1207921fbabbde"  # computed by the code before temperatures
    assert "temperatures" not in space.to_json()
    tempered = CaptureSpace(*fields, temperatures=(4, 2.0, 2))
    assert tempered.temperatures == (2.0, 4.0) and tempered.space_id != space.space_id
    assert CaptureSpace.from_json(tempered.to_json()) == tempered

    store = logitcache.open_store(str(OLD_STORE))
    record = next(iter(store.dataset("topk")))
    assert record.tempered_log_tails is None and record.temperatures == ()
    batch = Collator()([record])
    assert "teacher_tempered_log_tails" not in batch
    with pytest.raises(FailedPrecondition, match="captured: none"):
        tempered_batch_loss(torch.zeros(1, len(record), 1785), batch, 2.0)
