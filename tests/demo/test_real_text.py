"""The real-text teacher: text every machine has, held out by source file, a teacher vLLM's CPU
build can serve, and its held-out texts and corpus facts beside it."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from transformers import AutoConfig

from logitcache.demo import real_text
from logitcache.demo.teacher import METADATA_FILE, TARGET_VOCAB_SIZE
from logitcache.server.policy.licences import model_card_licence_of

VLLM_CPU_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}


def test_corpus_is_english_prose_of_the_standard_library_and_held_out_by_file() -> None:
    train, held_out = real_text.stdlib_documents()
    assert len(train) > 2000 and len(held_out) > 200
    assert sum(map(len, train)) > 1_000_000  # enough text for a 2,000-token BPE and 1,000 steps
    assert not set(train) & set(held_out)
    assert all(len(doc) >= real_text.MIN_DOCSTRING_CHARS for doc in (*train, *held_out))
    sources = real_text.stdlib_sources()
    held_out_files = sources[real_text.HELD_OUT_EVERY - 1 :: real_text.HELD_OUT_EVERY]
    held_out_docs = {d for source in held_out_files for d in real_text.docstrings(source)}
    assert set(held_out) <= held_out_docs
    assert not any("site-packages" in str(s) or "/test/" in str(s) for s in sources)


def test_real_text_teacher_ships_its_held_out_texts_and_corpus_facts(
    real_text_teacher: Path,
) -> None:
    _, held_out = real_text.stdlib_documents()
    lines = real_text.held_out_path(real_text_teacher).read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == list(held_out)
    facts = json.loads((real_text_teacher / METADATA_FILE).read_text())
    assert facts["corpus_sha256"] == real_text.corpus_digest()
    assert facts["python"] == platform.python_version()
    assert facts["train_steps"] == real_text.TRAIN_STEPS
    assert facts["held_out_loss"] < 5.0  # it learned the text (uniform over 2,000 is 7.6)
    assert facts["vocab_size"] == TARGET_VOCAB_SIZE


def test_real_text_teacher_is_servable_by_vllms_cpu_build(real_text_teacher: Path) -> None:
    config = AutoConfig.from_pretrained(str(real_text_teacher))
    assert config.head_dim in VLLM_CPU_HEAD_SIZES
    assert config.vocab_size == TARGET_VOCAB_SIZE


def test_real_text_teacher_declares_its_licence_in_its_model_card(real_text_teacher: Path) -> None:
    # The licence policy runs no job on a teacher that declares no licence.
    assert model_card_licence_of(real_text_teacher) == "apache-2.0"
    assert "Python standard library" in (real_text_teacher / "README.md").read_text()


def test_path_is_cached_under_the_python_version_and_recipe(real_text_teacher: Path) -> None:
    assert real_text.real_text_teacher_path() == real_text_teacher
    assert real_text_teacher.name.startswith("real-text-teacher-seed0-")
