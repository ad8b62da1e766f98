"""Padded vocabularies, both directions: a teacher padded beyond its tokenizer teaches a smaller
student (its entries on the padding ids fold into the tail), and a student padded beyond the
teacher keeps working as before.

The teacher's rows are exact log-softmax rows over a padded output layer whose padding rows have
very low logits, as a trained padded model's do, stored in a real store and read back through
``TeacherStream``; the tokenizer is one trained here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from logitcache.client.codecs import DEFAULT_CODEC, TopKRows
from logitcache.client.record import Record
from logitcache.client.space import CaptureSpace, record_key
from logitcache.client.tokenizer import legacy_tokenizer_fingerprint, tokenizer_fingerprint
from logitcache.server.store.store import open_store
from logitcache.server.store.writer import CapturedRecord
from logitcache.trainer import TeacherStream
from logitcache.trainer.collate import Collator, TeacherTargets
from logitcache.trainer.guards import IncompatibleStudent, check_student
from logitcache.trainer.losses import distillation_loss
from logitcache.trainer.vocab import FOLDED_ENTRIES, FOLDED_MASS

SEQ_LEN, RECORDS, PADDING_ROWS, EXTRA_K = 12, 6, 84, 16
QWEN_TOKENIZER = "tok2:151665:" + "0" * 64  # Qwen2.5's 151,665 ids; 7B has 152,064 rows


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[UNK]", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(["the cat sat on the mat", "a dog in the park"] * 20, trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


def exact_rows(rng: np.random.Generator, ids: np.ndarray, rows: int, real: int, k: int) -> TopKRows:
    """Top-k of log_softmax over ``rows`` ids, of which those from ``real`` up are padding."""
    logits = rng.normal(scale=3.0, size=(len(ids), rows))
    logits[:, real:] = -30.0 + rng.normal(size=(len(ids), rows - real))
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    order = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(logprobs, order, axis=1)
    outside = np.log1p(-np.exp(np.logaddexp.reduce(kept, axis=1)).clip(max=1 - 1e-12))
    target = np.append(logprobs[np.arange(len(ids) - 1), ids[1:]], np.nan)
    return TopKRows(
        token_ids=order.astype(np.int32),
        logprobs=kept.astype(np.float32),
        target_logprobs=target.astype(np.float32),
        tail_logprobs=outside.astype(np.float32),
    )


@pytest.fixture(scope="module")
def padded_store(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A dataset "padded" whose teacher has PADDING_ROWS rows beyond the tokenizer's ids.

    k exceeds the tokenizer's size, so every stored row holds EXTRA_K entries on padding ids.
    """
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    size = int(fingerprint.split(":")[1])
    rows, k = size + PADDING_ROWS, size + EXTRA_K
    space = CaptureSpace("padded-teacher", fingerprint, rows, "topk", k, "float32", DEFAULT_CODEC)
    root = tmp_path_factory.mktemp("padded") / "store"
    store = open_store(str(root), writable=True)
    rng = np.random.default_rng(0)
    records = []
    for _ in range(RECORDS):
        ids = rng.integers(0, size, SEQ_LEN, dtype=np.int32)
        key = record_key(space.space_id, ids)
        records.append(CapturedRecord.encode(key, ids, exact_rows(rng, ids, rows, size, k), space))
    store.write_segment(space, records)
    store.create_dataset("padded", space, [r.key for r in records], RECORDS * SEQ_LEN, {})
    store.mark_complete("padded")
    return str(root)


def stored(padded_store: str) -> tuple[CaptureSpace, list[Record]]:
    stream = TeacherStream(padded_store, "padded", shuffle=False)
    return stream.space, list(stream)


def total_log_mass(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log(kept mass + tail) at each real position: 0 where no mass was lost or made."""
    kept = torch.logsumexp(batch["teacher_logprobs"].double(), dim=-1)
    tail = batch["teacher_tail_logprobs"].double()
    return torch.logaddexp(kept, tail)[batch["teacher_mask"]]


# --- the guard's rule ------------------------------------------------------------------------------


def qwen_space(vocab_size: int = 152064, tokenizer: str = QWEN_TOKENIZER) -> CaptureSpace:
    return CaptureSpace("qwen2.5-7b", tokenizer, vocab_size, "topk", 64, "bfloat16", DEFAULT_CODEC)


def test_a_padded_teacher_teaches_any_student_from_the_tokenizer_size_up() -> None:
    space = qwen_space()
    assert space.tokenizer_size == 151665
    for student in (151936, 151665, 152064):  # Qwen2.5-0.5B, the tokenizer, the teacher
        check_student(space, tokenizer_fingerprint=QWEN_TOKENIZER, vocab_size=student)
    with pytest.raises(IncompatibleStudent) as err:
        check_student(space, tokenizer_fingerprint=QWEN_TOKENIZER, vocab_size=151664)
    msg = str(err.value)
    for part in ("151664", "152064", "every id the tokenizer can produce, 151665",
                 "ids 0..151664", "teacher rows 151665..152063 are padding"):  # fmt: skip
        assert part in msg, part


def test_a_student_padded_beyond_the_teacher_still_needs_the_flag() -> None:
    space = qwen_space()
    with pytest.raises(IncompatibleStudent, match="64 more rows.*allow_vocab_padding"):
        check_student(space, vocab_size=152128)
    check_student(space, vocab_size=152128, allow_vocab_padding=True)


def test_an_old_space_reads_the_tokenizer_size_from_the_student(tokenizer_dir: Path) -> None:
    """A pre-tok2 space does not record the size: the matched student's tokenizer gives it."""
    size = int(tokenizer_fingerprint(tokenizer_dir).split(":")[1])
    space = qwen_space(size + PADDING_ROWS, legacy_tokenizer_fingerprint(tokenizer_dir))
    assert space.tokenizer_size is None
    with pytest.raises(IncompatibleStudent, match="pass tokenizer_path="):
        check_student(space, vocab_size=size)
    check_student(space, tokenizer_path=tokenizer_dir, vocab_size=size)


def test_an_old_space_says_how_to_check_another_copy(tokenizer_dir: Path, tmp_path: Path) -> None:
    space = qwen_space(tokenizer=legacy_tokenizer_fingerprint(tokenizer_dir))
    copy = tmp_path / "instruct"
    copy.mkdir()
    for f in tokenizer_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    config = (
        (copy / "tokenizer_config.json").read_text().replace("{", '{"padding_side": "left",', 1)
    )
    (copy / "tokenizer_config.json").write_text(config)
    assert tokenizer_fingerprint(copy) == tokenizer_fingerprint(tokenizer_dir)
    with pytest.raises(IncompatibleStudent, match="fingerprint_matches") as err:
        check_student(space, tokenizer_path=copy)
    assert "before tokenizer fingerprints tok2" in str(err.value)
    check_student(space, tokenizer_fingerprint=space.tokenizer_fingerprint)  # once vouched for


# --- teacher padded beyond the student -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_entries_on_padding_ids_fold_into_the_tail(
    padded_store: str, tokenizer_dir: Path, mode: str
) -> None:
    space, records = stored(padded_store)
    size = space.tokenizer_size
    assert size is not None and space.vocab_size == size + PADDING_ROWS
    check_student(space, tokenizer_path=tokenizer_dir, vocab_size=size)
    on_padding = sum(int(((r.token_ids >= size) & (r.logprobs > -np.inf)).sum()) for r in records)
    assert on_padding == RECORDS * SEQ_LEN * EXTRA_K  # what the store holds

    seq_len = 2 * SEQ_LEN if mode == "pack" else None
    plain = Collator(mode=mode, seq_len=seq_len)(records)  # type: ignore[arg-type]
    batch = Collator(mode=mode, seq_len=seq_len, vocab_size=size)(records)  # type: ignore[arg-type]
    assert int(batch[FOLDED_ENTRIES]) == on_padding
    # padding: near-zero mass (the default codec stores p < 1e-3 within 1e-4 in probability)
    assert 0.0 < float(batch[FOLDED_MASS]) < EXTRA_K * 1e-4
    assert FOLDED_ENTRIES not in plain

    ids, lp = batch["teacher_token_ids"], batch["teacher_logprobs"]
    assert int(ids.max()) < size
    kept = lp > -torch.inf
    assert torch.equal(kept.sum(-1)[batch["teacher_mask"]], torch.full((RECORDS * SEQ_LEN,), size))
    # rows keep their entries in order, padding at the end; the mass moved into the tail
    assert torch.equal(lp[..., :size], plain["teacher_logprobs"][..., :size])
    assert not kept[..., size:].any()
    assert torch.allclose(total_log_mass(batch), total_log_mass(plain), atol=1e-6)
    assert torch.all(batch["teacher_tail_logprobs"] >= plain["teacher_tail_logprobs"])

    logits = torch.randn(*batch["input_ids"].shape, size, requires_grad=True)
    loss = distillation_loss(logits, TeacherTargets.from_batch(batch), alpha=0.1)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None
    with pytest.raises(ValueError):  # without the fold the student lacks the ids
        distillation_loss(logits, TeacherTargets.from_batch(plain))


def test_mass_that_is_not_padding_is_warned_about_and_sampled_draws_are_dropped() -> None:
    ids = np.array([[0, 5, 1], [2, 6, 0]], dtype=np.int32)
    lp = np.log(np.array([[0.5, 0.3, 0.1], [0.6, 1e-4, 0.2]], dtype=np.float32))
    tail = np.log(np.array([0.1, 0.1999], dtype=np.float32))
    topk = Record("a" * 64, np.array([1, 2], dtype=np.int32), ids, lp, np.array([-1.0, np.nan]),
                  tail_logprobs=tail)  # fmt: skip
    with pytest.warns(RuntimeWarning, match="up to 0.3 .* ids >= 5"):
        batch = Collator(vocab_size=5)([topk])
    assert batch["teacher_token_ids"].tolist() == [[[0, 1, 0], [2, 0, 0]]]
    np.testing.assert_allclose(batch["teacher_tail_logprobs"].exp().numpy(), [[0.4, 0.2]], 1e-5)
    assert int(batch[FOLDED_ENTRIES]) == 2

    counts = np.array([[3, 1, 0], [2, 2, 0]], dtype=np.int32)
    sampled = Record("b" * 64, topk.input_ids, ids, lp, topk.target_logprobs, counts=counts)
    with pytest.warns(RuntimeWarning):
        batch = Collator(vocab_size=5)([sampled])
    assert batch["teacher_counts"].tolist() == [[[3, 0, 0], [2, 0, 0]]]
    assert torch.isnan(batch["teacher_tail_logprobs"]).all()  # sampled rows have no tail
    assert int(batch[FOLDED_ENTRIES]) == 2
    with pytest.raises(ValueError, match="vocab_size"):
        Collator(vocab_size=0)


# --- student padded beyond the teacher -------------------------------------------------------------


def test_a_student_padded_beyond_the_teacher_keeps_working(padded_store: str) -> None:
    space, records = stored(padded_store)
    wide = space.vocab_size + 64
    with pytest.raises(IncompatibleStudent, match="allow_vocab_padding"):
        check_student(space, vocab_size=wide)
    check_student(space, vocab_size=wide, allow_vocab_padding=True)
    plain = Collator()(records)
    batch = Collator(vocab_size=wide)(records)
    assert int(batch[FOLDED_ENTRIES]) == 0 and float(batch[FOLDED_MASS]) == 0.0
    for name, value in plain.items():
        assert torch.equal(batch[name].nan_to_num(), value.nan_to_num()), name
    logits = torch.randn(*batch["input_ids"].shape, wide)
    assert torch.equal(
        distillation_loss(logits, TeacherTargets.from_batch(batch)),
        distillation_loss(logits, TeacherTargets.from_batch(plain)),
    )
