"""Build a tiny Llama teacher, trained on the synthetic demo language, without any network.

Demos and tests need a real model that vLLM can serve and whose next-token distributions
are peaked and meaningful, but they cannot download one. This module trains a tokenizer and a
~1.3M parameter Llama on text of the demo language (:mod:`logitcache.demo.language`) in about a
minute on two CPU cores, and saves them as an ordinary Hugging Face model directory. The same
recipe trains on another :class:`Corpus`: the real-text teacher (:mod:`logitcache.demo.real_text`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from logitcache.demo.language import generate_documents

BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, PAD_TOKEN = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, PAD_TOKEN]
TARGET_VOCAB_SIZE = 2000
TRAIN_DOCUMENTS = 8000
HELD_OUT_DOCUMENTS = 300
SEQUENCE_LENGTH = 128
MAX_POSITIONS = 1024
BATCH_SIZE = 16
TRAIN_STEPS = 400
WARMUP_STEPS = 30
PEAK_LEARNING_RATE = 3e-3
FINAL_LOSS_WINDOW = 20
# Marks a directory as a demo teacher, which is what lets a rebuild replace it.
METADATA_FILE = "demo_teacher.json"
# Part of the cache name (with the numbers above): bump it when this module or the demo language
# builds something else from the same numbers (a new model shape, grammar or training step).
RECIPE_VERSION = 1


@dataclass(frozen=True)
class Corpus:
    """What a teacher learns from: train and held-out documents for a seed, and for how long."""

    name: str
    documents: Callable[[int], tuple[list[str], list[str]]]
    train_steps: int = TRAIN_STEPS


def demo_language_documents(seed: int) -> tuple[list[str], list[str]]:
    """Train and held-out documents of the demo language."""
    documents = generate_documents(TRAIN_DOCUMENTS + HELD_OUT_DOCUMENTS, seed)
    return documents[:TRAIN_DOCUMENTS], documents[TRAIN_DOCUMENTS:]


DEMO_LANGUAGE = Corpus("demo", demo_language_documents)


def recipe(corpus: Corpus) -> dict[str, object]:
    """What a build of ``corpus`` depends on, for the cache name: the numbers and the version."""
    return dict(
        version=RECIPE_VERSION,
        corpus=corpus.name,
        train_steps=corpus.train_steps,
        vocab_size=TARGET_VOCAB_SIZE,
        documents=[TRAIN_DOCUMENTS, HELD_OUT_DOCUMENTS],
        sequence_length=SEQUENCE_LENGTH,
        max_positions=MAX_POSITIONS,
        batch_size=BATCH_SIZE,
        warmup_steps=WARMUP_STEPS,
        peak_learning_rate=PEAK_LEARNING_RATE,
    )


@dataclass(frozen=True)
class BuildReport:
    """What `demo_teacher.json` records, so users can judge the teacher without reloading it."""

    seed: int
    vocab_size: int
    train_steps: int
    final_loss: float
    held_out_loss: float
    build_seconds: float


def train_tokenizer(documents: Sequence[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE, so any text encodes without `<unk>`; prepends `<s>` like Llama's."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
    )


def token_blocks(tokenizer: PreTrainedTokenizerFast, documents: Sequence[str]) -> torch.Tensor:
    """Concatenate `<s> doc </s>` token streams and cut them into full training sequences."""
    encoded = tokenizer(list(documents), add_special_tokens=True)["input_ids"]
    eos_id = tokenizer.eos_token_id
    stream = torch.tensor([token for ids in encoded for token in (*ids, eos_id)])
    usable = len(stream) - len(stream) % SEQUENCE_LENGTH
    return stream[:usable].view(-1, SEQUENCE_LENGTH)


def teacher_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """Small enough to train in a minute; head_dim 64 because vLLM's CPU attention needs it."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def learning_rate_factor(step: int, steps: int = TRAIN_STEPS) -> float:
    """Linear warm-up, then cosine decay to a tenth: stable and converged in few steps."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def train(
    model: LlamaForCausalLM,
    blocks: torch.Tensor,
    seed: int,
    progress: bool,
    corpus: Corpus = DEMO_LANGUAGE,
) -> list[float]:
    """Run AdamW over randomly ordered blocks; returns the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LEARNING_RATE, weight_decay=0.01)
    steps = corpus.train_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, steps)
    )
    epochs = math.ceil(steps * BATCH_SIZE / len(blocks))
    order = torch.cat([torch.randperm(len(blocks), generator=generator) for _ in range(epochs)])
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=f"training {corpus.name} teacher", disable=not progress)
    for step in bar:
        batch = blocks[order[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


@torch.no_grad()
def mean_loss(model: LlamaForCausalLM, blocks: torch.Tensor) -> float:
    """Cross-entropy per token over all blocks; batches are weighted by their block count."""
    model.eval()
    batches = blocks.split(BATCH_SIZE * 2)
    batch_losses = torch.stack([model(input_ids=batch, labels=batch).loss for batch in batches])
    block_counts = torch.tensor([len(batch) for batch in batches])
    return float((batch_losses * block_counts).sum() / block_counts.sum())


def save_model(model: LlamaForCausalLM, directory: pathlib.Path, progress: bool) -> None:
    """Save float32 safetensors; transformers' own progress bar obeys our `progress` flag."""
    bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    if not progress:
        transformers_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
    finally:
        if bars_were_enabled:
            transformers_logging.enable_progress_bar()


def is_replaceable(out_dir: pathlib.Path) -> bool:
    """Only an empty directory or an earlier demo teacher may be overwritten, never user data."""
    if not out_dir.exists():
        return True
    return out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / METADATA_FILE).is_file())


def move_into_place(staging_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Swap the finished build in with renames, so out_dir is never seen half-written."""
    if not is_replaceable(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a demo teacher; not replacing it")
    if out_dir.exists():
        previous = staging_dir.with_name(staging_dir.name + ".old")
        out_dir.rename(previous)
        staging_dir.rename(out_dir)
        shutil.rmtree(previous)
    else:
        staging_dir.rename(out_dir)


def build_into(
    staging_dir: pathlib.Path, seed: int, progress: bool, started: float, corpus: Corpus
) -> None:
    """Train tokenizer and model from scratch and write everything into staging_dir."""
    train_documents, held_out_documents = corpus.documents(seed)

    tokenizer = train_tokenizer(train_documents)
    train_blocks = token_blocks(tokenizer, train_documents)
    held_out_blocks = token_blocks(tokenizer, held_out_documents)

    torch.manual_seed(seed)
    model = LlamaForCausalLM(teacher_config(tokenizer))
    losses = train(model, train_blocks, seed, progress, corpus)
    held_out_loss = mean_loss(model, held_out_blocks)

    save_model(model, staging_dir, progress)
    tokenizer.save_pretrained(staging_dir)
    report = BuildReport(
        seed=seed,
        vocab_size=len(tokenizer),
        train_steps=corpus.train_steps,
        final_loss=round(sum(losses[-FINAL_LOSS_WINDOW:]) / FINAL_LOSS_WINDOW, 4),
        held_out_loss=round(held_out_loss, 4),
        build_seconds=round(time.perf_counter() - started, 1),
    )
    (staging_dir / METADATA_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    if progress:
        print(
            f"{corpus.name} teacher: final loss {report.final_loss:.3f}, held-out loss "
            f"{report.held_out_loss:.3f}, built in {report.build_seconds:.0f} s"
        )


def build_demo_teacher(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    *,
    progress: bool = True,
    corpus: Corpus = DEMO_LANGUAGE,
) -> pathlib.Path:
    """Build the demo teacher into out_dir and return its path.

    The same seed on the same machine gives byte-identical model.safetensors and
    tokenizer.json. The build happens in a hidden sibling directory that is renamed into
    place at the end, so an interrupted build leaves nothing that looks complete. An
    existing out_dir is replaced only if it is empty or an earlier demo teacher.
    """
    started = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    with staged_build(out_dir) as staging_dir:
        build_into(staging_dir, seed, progress, started, corpus)
    return out_dir


@contextlib.contextmanager
def staged_build(out_dir: pathlib.Path) -> Iterator[pathlib.Path]:
    """A hidden sibling of out_dir to build in, renamed into place when the block ends, on two
    threads with deterministic kernels and the caller's random state left as it was."""
    if not is_replaceable(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a demo teacher; not replacing it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # mkdir rather than mkdtemp: the finished directory should get the usual umask permissions.
    staging_dir = out_dir.with_name(f".{out_dir.name}.partial-{uuid.uuid4().hex[:12]}")
    staging_dir.mkdir()

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    deterministic_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # Results depend on how reductions are split across threads: pin the count.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield staging_dir
        move_into_place(staging_dir, out_dir)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=deterministic_warn_only)
        shutil.rmtree(staging_dir, ignore_errors=True)
