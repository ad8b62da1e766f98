"""A teacher's identity: its tokenizer by what decides the ids, its chat template on its own.

The teacher directories are written here (a config, weight bytes, a tokenizer trained with
`tokenizers`); resolving one reads them and never loads the weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from logitcache.client.tokenizer import legacy_tokenizer_fingerprint, tokenizer_fingerprint
from logitcache.server.teachers.identity import resolve_teacher, topk_space


@pytest.fixture
def teacher(tmp_path: Path) -> Path:
    path = tmp_path / "base"
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=["[UNK]", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(["the cat sat on the mat"] * 20, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 320,
              "max_position_embeddings": 64, "torch_dtype": "float32"}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"weights")
    return path


def test_an_instruct_template_keeps_the_tokenizer_and_the_capture_space(
    teacher: Path, tmp_path: Path
) -> None:
    instruct = tmp_path / "instruct"
    shutil.copytree(teacher, instruct)
    # where checkpoints written by transformers 4 keep it, and the file-bytes fingerprint looks
    config = json.loads((instruct / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"
    (instruct / "tokenizer_config.json").write_text(json.dumps(config))
    base, chat = resolve_teacher(str(teacher)), resolve_teacher(str(instruct))

    size = len(AutoTokenizer.from_pretrained(str(teacher)))
    assert base.tokenizer_fingerprint == tokenizer_fingerprint(teacher)
    assert base.tokenizer_fingerprint.startswith(f"tok2:{size}:")
    assert chat.tokenizer_fingerprint == base.tokenizer_fingerprint
    assert base.chat_template_fingerprint is None
    assert chat.chat_template_fingerprint is not None
    assert topk_space(base, "float32", 8).space_id == topk_space(chat, "float32", 8).space_id

    # spaces written before tok2 recorded the file bytes, which the chat template changes
    old = legacy_tokenizer_fingerprint(teacher)
    assert base.legacy_tokenizer_fingerprint == old != chat.legacy_tokenizer_fingerprint
    assert base.tokenizer_matches(old) and base.tokenizer_matches(base.tokenizer_fingerprint)
    assert not chat.tokenizer_matches(old)
    # the output layer is padded beyond the tokenizer; the space records both sizes
    space = topk_space(base, "float32", 8)
    assert (space.tokenizer_size, space.vocab_size) == (size, 320) and size < 320
