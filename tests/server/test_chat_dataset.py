"""Loss masks stored with a dataset: written and sealed with its key list, read back when it is
streamed, from the store and through a server; precompute of chat rows end to end.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from counting_engine import CountingEngine

import logitcache
from logitcache.client.errors import FailedPrecondition
from logitcache.client.space import CaptureSpace, record_key
from logitcache.server.chat import TEMPLATES_DIR, chat_renderer
from logitcache.server.launcher import ServerProcess
from logitcache.server.precompute import PrecomputeRequest, precompute
from logitcache.server.store import masks as store_masks
from logitcache.server.store.store import open_store
from logitcache.trainer import TeacherStream
from logitcache.trainer.collate import TeacherTargets, collate_records
from logitcache.trainer.losses import distillation_loss

K = 8
CONVERSATIONS = [
    [
        {"role": "system", "content": "answer in one line"},
        {"role": "user", "content": "where did the cat sit"},
        {"role": "assistant", "content": "the cat sat on the mat"},
        {"role": "user", "content": "and the dog"},
        {"role": "assistant", "content": "a dog ran far away"},
    ],
    [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello there"}],
    [{"role": "user", "content": "a question nobody answers"}],
    [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello there"}],
]


def test_masks_are_stored_with_the_dataset(tmp_path: Path, monkeypatch) -> None:
    """Masks of any lengths come back exactly, in any order and from several datasets that share
    keys with other masks; a dataset without masks has none; damage is refused, not shifted."""
    monkeypatch.setattr(store_masks, "_PACK_POSITIONS", 13)  # pack in many small steps
    monkeypatch.setattr(store_masks, "_CHUNK_BYTES", 16)  # and read many small chunks
    store = open_store(str(tmp_path / "store"), writable=True)
    space = CaptureSpace("t" * 64, "tok", 100, "topk", K, "float32", "topk-q64-delta-v1")
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=50)
    keys = [record_key(space.space_id, np.arange(n, dtype=np.int32) + i) for i, n in enumerate(lengths)]  # fmt: skip
    first = [rng.integers(0, 2, size=n).astype(np.uint8) for n in lengths]
    second = [1 - m for m in first]
    positions = int(lengths.sum())
    store.create_dataset("first", space, keys, positions, {}, loss_masks=first)
    store.create_dataset("second", space, keys, positions, {}, loss_masks=second)
    store.create_dataset("plain", space, keys, positions, {})

    reader = open_store(str(tmp_path / "store"))
    assert reader.dataset("plain").loss_masks is None
    order = rng.permutation(len(keys))
    for whole in (0, 1 << 24):  # read chunk by chunk, and read whole then cut in memory
        monkeypatch.setattr(store_masks, "_WHOLE_BYTES", whole)
        for name, expected in (("first", first), ("second", second)):
            masks = reader.dataset(name).loss_masks
            assert masks is not None and len(masks) == len(keys)
            got = masks.read(order, lengths[order])
            np.testing.assert_array_equal(got, np.concatenate([expected[i] for i in order]))
            np.testing.assert_array_equal(masks[7], expected[7])
    with pytest.raises(FailedPrecondition, match="the loss mask of sequence 3 has"):
        reader.dataset("first").loss_masks.read([3], [int(lengths[3]) + 1])
    with pytest.raises(ValueError, match="49 loss masks for a dataset of 50 sequences"):
        store.create_dataset("short", space, keys, positions, {}, loss_masks=first[:-1])
    assert "short" not in store.datasets()  # nothing published


@pytest.fixture(scope="module")
def chat_store(demo_teacher: Path, tmp_path_factory) -> Iterator[Path]:
    """A store with "chat" (chat rows, ChatML, masks) and "ids": the same token ids as plain id
    rows, which reuses chat's records and has no masks."""
    folder = tmp_path_factory.mktemp("chat-dataset")
    data = folder / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    store_url = str(folder / "store")
    req = PrecomputeRequest(
        teacher=str(demo_teacher), data=data, out=store_url, dataset="chat", top_k=K,
        progress=False, messages_field="messages", chat_template="chatml",
    )  # fmt: skip
    first = asyncio.run(precompute(req, engine_factory=CountingEngine))
    assert (first.sequences, first.computed_sequences) == (4, 3)  # one conversation twice
    renderer = chat_renderer(demo_teacher, "messages", "chatml")
    ids = folder / "ids.jsonl"
    ids.write_text(
        "".join(
            json.dumps({"input_ids": renderer.render(c)[0].tolist()}) + "\n" for c in CONVERSATIONS
        )  # fmt: skip
    )
    again = PrecomputeRequest(
        teacher=str(demo_teacher), data=ids, out=store_url, dataset="ids", top_k=K,
        progress=False,
    )  # fmt: skip
    second = asyncio.run(precompute(again, engine_factory=CountingEngine))
    assert second.computed_sequences == 0  # the records are shared; the masks are not
    yield folder / "store"


def _expected(demo_teacher: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    renderer = chat_renderer(demo_teacher, "messages", "chatml")
    return [renderer.render(c) for c in CONVERSATIONS]


def test_precomputed_chat_rows_keep_their_masks(demo_teacher: Path, chat_store: Path) -> None:
    store = logitcache.open_store(str(chat_store))
    chat, ids = store.dataset("chat"), store.dataset("ids")
    assert chat.keys == ids.keys
    assert ids.loss_masks is None and ids[0].loss_mask is None
    template = (TEMPLATES_DIR / "chatml.jinja").read_text()
    assert chat.provenance["chat"] == {
        "messages_field": "messages",
        "chat_template": "chatml",
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "assistant_mask": "generation markers",
    }
    assert "chat" not in ids.provenance
    for i, (expected_ids, expected_mask) in enumerate(_expected(demo_teacher)):
        record = chat[i]
        np.testing.assert_array_equal(record.input_ids, expected_ids)
        np.testing.assert_array_equal(record.loss_mask, expected_mask)
    assert not chat[2].loss_mask.any()  # nobody answers: nothing to learn from


def _streamed(source: str, dataset: str) -> dict[str, list]:
    """Each key's masks as streamed (a key listed twice comes twice)."""
    seen: dict[str, list] = {}
    for record in TeacherStream(source, dataset, seed=3, batch_records=3):
        seen.setdefault(record.key, []).append(record.loss_mask)
    return seen


def _check_streamed(seen: dict[str, list], demo_teacher: Path, chat_store: Path) -> None:
    store = logitcache.open_store(str(chat_store))
    chat = store.dataset("chat")
    masks = {chat.keys[i]: m for i, (_, m) in enumerate(_expected(demo_teacher))}
    assert sorted(len(v) for v in seen.values()) == [1, 1, 2]
    for key, got in seen.items():
        for mask in got:
            np.testing.assert_array_equal(mask, masks[key])


def test_a_chat_dataset_streams_its_masks_from_the_store(
    demo_teacher: Path, chat_store: Path
) -> None:
    seen = _streamed(str(chat_store), "chat")
    _check_streamed(seen, demo_teacher, chat_store)
    store = logitcache.open_store(str(chat_store))
    records = list(TeacherStream(str(chat_store), "chat", shuffle=False))
    batch = collate_records(records, pin_memory=False)
    assert batch["teacher_mask"].tolist() == batch["loss_mask"].tolist()
    assert int(batch["loss_mask"].sum()) == sum(int(m.sum()) for _, m in _expected(demo_teacher))
    # The streamed masks reach the loss: what the student predicts off the assistant's turns
    # changes nothing.
    targets = TeacherTargets.from_batch(batch)
    logits = torch.randn(*batch["input_ids"].shape, store.dataset("chat").space.vocab_size)
    moved = logits.clone()
    moved[~batch["loss_mask"]] = torch.randn_like(moved[~batch["loss_mask"]])
    loss = distillation_loss(logits, targets, alpha=0.5)
    assert torch.equal(distillation_loss(moved, targets, alpha=0.5), loss)
    plain = list(TeacherStream(str(chat_store), "ids", shuffle=False))
    assert all(r.loss_mask is None for r in plain)


@pytest.mark.slow  # a server process (store-only: it starts in about a second)
def test_a_chat_dataset_streams_its_masks_through_a_server(
    demo_teacher: Path, chat_store: Path
) -> None:
    with ServerProcess(None, chat_store) as server:
        source = "grpc://" + server.target
        _check_streamed(_streamed(source, "chat"), demo_teacher, chat_store)
        assert all(m is None for got in _streamed(source, "ids").values() for m in got)


def test_a_server_job_renders_chat_rows_with_the_teachers_template(
    demo_teacher: Path, tmp_path: Path
) -> None:
    """A job's messages_field (as the wire gives it) renders chat rows with its teacher's own
    template, and the dataset it builds keeps the masks."""
    import shutil

    from job_managers import USE, last_update, manager

    from logitcache.server.config import TeacherConfig
    from logitcache.server.grpc import convert
    from logitcache.server.jobs import Job, JobState
    from logitcache.server.policy.admission import Admission
    from logitcache.server.teachers.registry import TeacherRegistry
    from logitcache.v1 import logitcache_pb2 as pb

    teacher = tmp_path / "chat-teacher"
    shutil.copytree(demo_teacher, teacher)
    config = json.loads((teacher / "tokenizer_config.json").read_text())
    template = (TEMPLATES_DIR / "chatml.jinja").read_text()
    config["chat_template"] = template
    (teacher / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"turns": c}) + "\n" for c in CONVERSATIONS))
    spec = convert.job_spec(
        pb.JobSpec(dataset="chat", server_path=str(data), messages_field="turns")
    )
    assert spec.messages_field == "turns"
    assert convert.job_message(Job(id="j", spec=spec)).spec.messages_field == "turns"
    spec.use = USE
    url = str(tmp_path / "store")

    async def scenario():
        registry = await TeacherRegistry.start(
            [TeacherConfig("chat", str(teacher), max_top_k=K, default_top_k=K)], CountingEngine
        )
        jobs = manager(url, registry, admission=Admission(input_roots=(tmp_path,)))
        try:
            accepted = await jobs.submit(spec, [], [])
            return await last_update(jobs, accepted.id)
        finally:
            await jobs.close()
            registry.shutdown()

    done = asyncio.run(scenario())
    assert done.state is JobState.COMPLETED, done.error
    ds = logitcache.open_store(url).dataset("chat")
    chat = ds.provenance["chat"]
    assert chat["chat_template"] == "teacher"
    assert chat["chat_template_sha256"] == hashlib.sha256(template.encode()).hexdigest()
    for i, (ids, mask) in enumerate(_expected(demo_teacher)):
        np.testing.assert_array_equal(ds[i].input_ids, ids)
        np.testing.assert_array_equal(ds[i].loss_mask, mask)


def test_precompute_takes_the_chat_flags() -> None:
    from logitcache.cli import build_parser

    common = ["precompute", "--teacher", "t", "--data", "d.jsonl", "--out", "s", "--dataset", "n"]
    args = build_parser().parse_args(
        [*common, "--top-k", "8", "--messages-field", "messages", "--chat-template", "llama3"]
    )
    assert (args.messages_field, args.chat_template) == ("messages", "llama3")
    plain = build_parser().parse_args([*common, "--top-k", "8"])
    assert (plain.messages_field, plain.chat_template) == ("", None)
