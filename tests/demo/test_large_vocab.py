"""The large-vocabulary teacher: its lexicon fills 131,072 rows, its corpus uses most of them,
and the builder (run on a tiny recipe) writes a teacher whose held-out texts encode back to the
ids it generated and whose every row, the last ones included, gets probability mass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from logitcache.demo import large_vocab
from logitcache.demo.teacher import METADATA_FILE, SPECIAL_TOKENS
from logitcache.server.engine.reference import TransformersReference

TINY = large_vocab.Recipe(
    vocab_size=len(SPECIAL_TOKENS) + 8 * 60,
    classes=8,
    document_words=31,
    train_documents=256,
    held_out_documents=4,
    train_steps=3,
)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("large-vocab") / "teacher"
    return large_vocab.build_large_vocab_teacher(out, seed=0, recipe=TINY, progress=False)


def test_default_recipe_has_128k_rows_and_its_corpus_uses_most_of_them() -> None:
    recipe = large_vocab.LARGE
    assert recipe.vocab_size >= 128 * 1024
    tokenizer = large_vocab.word_tokenizer(recipe)
    assert len(tokenizer) == recipe.vocab_size
    words = recipe.vocab_size - len(SPECIAL_TOKENS)
    assert words % recipe.classes == 0  # every class has the same ranks
    ids = large_vocab.generate_word_ids(recipe, recipe.train_documents, seed=0)
    assert ids.min() == len(SPECIAL_TOKENS) and ids.max() < recipe.vocab_size
    assert len(np.unique(ids)) > words / 2
    assert large_vocab.model_config(recipe, tokenizer).head_dim in {32, 64, 80, 96, 112, 128}


def test_lexicon_words_are_distinct_and_shortest_first() -> None:
    words = large_vocab.lexicon(10_000)
    assert len(set(words)) == len(words)
    assert [len(w) for w in words] == sorted(len(w) for w in words)


def test_built_teacher_encodes_its_held_out_texts_and_gives_the_top_ids_mass(
    tiny_teacher: Path,
) -> None:
    config = AutoConfig.from_pretrained(tiny_teacher)
    assert config.vocab_size == TINY.vocab_size and config.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    texts = [json.loads(line)["text"] for line in (tiny_teacher / "held_out.jsonl").open()]
    expected = large_vocab.generate_word_ids(TINY, TINY.held_out_documents, 0 + 1_000_003)
    encoded = tokenizer(texts)["input_ids"]
    assert [ids[1:] for ids in encoded] == expected.tolist()
    assert all(ids[0] == tokenizer.bos_token_id for ids in encoded)
    facts = json.loads((tiny_teacher / METADATA_FILE).read_text())
    assert 0 < facts["held_out_top_64_mass"] <= 1 and facts["held_out_mean_entropy"] > 0
    logprobs = TransformersReference(tiny_teacher).full_logprobs(np.asarray(encoded[0]))
    assert logprobs.shape[1] == TINY.vocab_size
    assert bool((logprobs[:, -5:].exp() > 0).all())


def test_benchmark_sequences_of_the_teacher_are_its_own_held_out_texts(tiny_teacher: Path) -> None:
    from logitcache.bench.synthetic import benchmark_sequences

    first = large_vocab.generate_word_ids(TINY, TINY.held_out_documents, 0 + 1_000_003)[0]
    sequences = benchmark_sequences(str(tiny_teacher), 2, 16)
    assert np.concatenate(sequences)[1:].tolist() == first[:31].tolist()
