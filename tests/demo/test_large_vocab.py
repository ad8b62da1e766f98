"""The large-vocabulary teacher: its lexicon fills 131,072 rows and its grammar puts every word in
one class, its text follows the class chain, its fused loss is the plain cross-entropy, its sampled
softmax's normaliser is the full one's on average, and the builder (run on a tiny recipe) writes a
teacher whose held-out texts encode back to the ids it generated and whose every row, the last
ones included, gets probability mass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from logitcache.demo import large_vocab
from logitcache.demo.large_vocab import Tier
from logitcache.demo.teacher import METADATA_FILE, SPECIAL_TOKENS
from logitcache.server.engine.reference import TransformersReference

TINY = large_vocab.Recipe(
    vocab_size=len(SPECIAL_TOKENS) + 8 * 60,
    tiers=(Tier(4, 8, 1.2), Tier(4, None, 0.5)),
    successor_weights=((1, 1), (1, 0.5)),
    train_blocks=32,
    held_out_documents=8,
    negatives=64,  # of 480 rows: the build trains through a sampled softmax
)
HELD_OUT_SEED = 0 + large_vocab.HELD_OUT_SEED_OFFSET


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("large-vocab") / "teacher"
    return large_vocab.build_large_vocab_teacher(out, seed=0, recipe=TINY, progress=False)


def test_default_recipe_has_128k_rows_and_its_language_uses_most_of_them() -> None:
    recipe = large_vocab.LARGE
    assert recipe.vocab_size >= 128 * 1024
    tokenizer = large_vocab.word_tokenizer(recipe)
    assert len(tokenizer) == recipe.vocab_size
    grammar = large_vocab.language(recipe)
    first = len(SPECIAL_TOKENS)
    assert sorted(grammar.token_of.tolist()) == list(range(first, recipe.vocab_size))
    documents = recipe.train_blocks * recipe.block_tokens // (recipe.document_words + 1)
    ids = large_vocab.generate_word_ids(recipe, documents, seed=0)
    assert ids.min() >= first and ids.max() < recipe.vocab_size
    assert len(np.unique(ids)) > (recipe.vocab_size - first) / 5  # the training text: a fifth
    sample = large_vocab.generate_word_ids(recipe, 100_000, seed=1)  # 3.1M words: most
    assert len(np.unique(sample)) > (recipe.vocab_size - first) / 2
    assert large_vocab.model_config(recipe, tokenizer).head_dim in {32, 64, 80, 96, 112, 128}


def test_text_walks_the_class_chain_and_frequent_ranks_get_low_ids() -> None:
    grammar = large_vocab.language(TINY)
    class_of = np.empty(TINY.vocab_size, dtype=np.int64)
    class_of[grammar.token_of] = np.repeat(np.arange(len(grammar.class_sizes)), grammar.class_sizes)
    ids = large_vocab.generate_word_ids(TINY, 2_000, seed=3)
    classes = class_of[ids]
    allowed = grammar.successors[classes[:, :-1]]
    assert (allowed == classes[:, 1:, None]).any(axis=-1).all()
    counts = np.bincount(ids.ravel(), minlength=TINY.vocab_size)[len(SPECIAL_TOKENS) :]
    assert counts[:8].sum() > 2 * counts[-8:].sum()  # tier 0's first ranks lead the ids


def test_workspace_cross_entropy_is_the_plain_loss_and_its_gradients_with_a_bias() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=generator)
    bias = torch.randn(50, dtype=torch.float64, generator=generator)
    workspace = hidden.new_empty(10, 60)  # wider than the rows: a step may score fewer
    fused = large_vocab.workspace_cross_entropy(hidden, weight, targets, workspace, bias=bias)
    (2 * fused).backward()
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    plain = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, targets)
    (2 * plain).backward()
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(grads, (hidden.grad, weight.grad))


def test_sampled_rows_hold_every_target_and_distinct_others_weighted_for_the_rest() -> None:
    generator = torch.Generator().manual_seed(2)
    targets = torch.tensor([7, 3, 7, 41, 3, 0])
    rows, target_index, log_weight = large_vocab.sampled_rows(targets, 50, 9, generator)
    assert rows[target_index].tolist() == targets.tolist()
    assert len(rows) == 4 + 9 and len(set(rows.tolist())) == len(rows)
    assert log_weight[:4].tolist() == [0.0] * 4
    torch.testing.assert_close(log_weight[4:], torch.full((9,), float(np.log(46 / 9))))


def test_sampled_normaliser_is_the_full_one_on_average_and_exactly_with_every_row() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(50, dtype=torch.float64, generator=generator) / 2
    targets = torch.tensor([1, 5, 5, 9])
    sampled = []
    for _ in range(1_000):  # standard error 0.5%; weights of 50/6 (not 46/6) would be 8% off
        rows, _, log_weight = large_vocab.sampled_rows(targets, 50, 6, generator)
        sampled.append(float((logits[rows] + log_weight).exp().sum()))
    full = float(logits.exp().sum())
    assert abs(np.mean(sampled) / full - 1) < 0.02
    rows, target_index, log_weight = large_vocab.sampled_rows(targets, 50, 100, generator)
    assert sorted(rows.tolist()) == list(range(50)) and not log_weight.any()
    hidden = torch.randn(4, 8, dtype=torch.float64, generator=generator)
    weight = torch.randn(50, 8, dtype=torch.float64, generator=generator)
    sampled_loss = large_vocab.workspace_cross_entropy(
        hidden, weight[rows], target_index, hidden.new_empty(3, 50), bias=log_weight.double()
    )
    torch.testing.assert_close(
        sampled_loss, torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    )


def test_bfloat16_gradient_matmuls_stay_near_the_exact_gradient_at_near_certain_positions() -> None:
    """Within 0.5%; rounding p to bfloat16 before subtracting 1 (its spacing near 1 is 0.004)
    doubles that here, and rounding the logits makes it 3%."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 16, dtype=torch.float64, generator=generator)
    weight = torch.randn(500, 16, dtype=torch.float64, generator=generator)
    targets = (hidden @ weight.T).argmax(-1)
    weight[targets] *= 3.5  # the targets lead by far: most positions are near-certain
    exact = [t.clone().requires_grad_() for t in (hidden, weight)]
    loss = torch.nn.functional.cross_entropy(exact[0] @ exact[1].T, targets)
    loss.backward()
    assert float(loss) < 0.1
    fast = [t.float().requires_grad_() for t in (hidden, weight)]
    workspace, low = torch.empty(16, 500), torch.empty(16, 500, dtype=torch.bfloat16)
    large_vocab.workspace_cross_entropy(fast[0], fast[1], targets, workspace, low).backward()
    for mine, plain in zip(fast, exact, strict=True):
        assert mine.grad is not None and plain.grad is not None
        assert float((mine.grad.double() - plain.grad).norm() / plain.grad.norm()) < 0.005


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
    expected = large_vocab.generate_word_ids(TINY, TINY.held_out_documents, HELD_OUT_SEED)
    encoded = tokenizer(texts)["input_ids"]
    assert [ids[1:] for ids in encoded] == expected.tolist()
    assert all(ids[0] == tokenizer.bos_token_id for ids in encoded)
    facts = json.loads((tiny_teacher / METADATA_FILE).read_text())
    assert 0 < facts["held_out_top_64_mass"] <= 1 and facts["held_out_mean_entropy"] > 0
    assert facts["train_tokens"] == TINY.train_blocks * TINY.block_tokens
    logprobs = TransformersReference(tiny_teacher).full_logprobs(np.asarray(encoded[0]))
    assert logprobs.shape[1] == TINY.vocab_size
    assert bool((logprobs[:, -5:].exp() > 0).all())


def test_benchmark_sequences_of_the_teacher_are_its_own_held_out_texts(tiny_teacher: Path) -> None:
    from logitcache.bench.synthetic import benchmark_sequences

    first = large_vocab.generate_word_ids(TINY, TINY.held_out_documents, HELD_OUT_SEED)[0]
    sequences = benchmark_sequences(str(tiny_teacher), 2, 16)
    assert np.concatenate(sequences)[1:].tolist() == first[:31].tolist()
