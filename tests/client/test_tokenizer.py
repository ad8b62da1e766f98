"""Tokenizer identity: directories that tokenise alike match, any change to the ids does not.

The tokenizers are trained here with `tokenizers` (and sentencepiece for the slow kind) and saved
with transformers, as a checkpoint ships them; each variant is checked against what transformers
itself encodes, so "same fingerprint" is tied to "same ids".
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from logitcache.client.errors import InvalidArgument, NotFound
from logitcache.client.tokenizer import (
    LEGACY_TOKENIZER_FILES,
    chat_template_fingerprint,
    fingerprint_matches,
    fingerprint_tokenizer_size,
    is_legacy_fingerprint,
    legacy_tokenizer_fingerprint,
    short_fingerprint,
    tokenizer_fingerprint,
    tokenizer_size,
)

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "the end of the day"] * 20
SAMPLES = ["the cat ran", " The END of a mat", "<|user|>hi the dog<|end|>"]

# --- fast tokenizers (tokenizer.json) --------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE with a normaliser, a bos template, a decoder and added tokens, as saved."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["[UNK]", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|end|>"]})
    path = tmp_path_factory.mktemp("tok") / "base"
    fast.save_pretrained(path)
    return path


def variant(base: Path, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    shutil.copytree(base, path)
    return path


def edit_json(f: Path, change: Any) -> None:
    obj = json.loads(f.read_text())
    change(obj)
    f.write_text(json.dumps(obj, indent=4))


def encode(path: Path) -> list[list[int]]:
    return AutoTokenizer.from_pretrained(str(path))(SAMPLES)["input_ids"]


def same_tokenisation_files(path: Path) -> None:
    """Everything a checkpoint of the same family may change without changing a single id."""

    def config(obj: dict[str, Any]) -> None:
        obj["model_max_length"] = 32768
        obj["padding_side"] = "left"
        obj["truncation_side"] = "left"
        obj["clean_up_tokenization_spaces"] = True
        obj["eos_token"] = "<|end|>"  # an instruct checkpoint's end of turn
        obj["pad_token"] = "</s>"
        obj["chat_template"] = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"

    edit_json(path / "tokenizer_config.json", config)
    (path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "</s>"}))


def test_files_that_do_not_change_ids_do_not_count(base: Path, tmp_path: Path) -> None:
    other = variant(base, tmp_path, "instruct")
    same_tokenisation_files(other)
    assert encode(other) == encode(base)
    assert tokenizer_fingerprint(other) == tokenizer_fingerprint(base)
    assert legacy_tokenizer_fingerprint(other) != legacy_tokenizer_fingerprint(base)
    assert chat_template_fingerprint(other) != chat_template_fingerprint(base)


def old_serialisation(obj: dict[str, Any]) -> None:
    """tokenizer.json as an older `tokenizers` wrote it: "a b" merges, fewer default options."""
    obj["model"]["merges"] = [" ".join(pair) for pair in obj["model"]["merges"]]
    for option in ("ignore_merges", "byte_fallback", "fuse_unk", "dropout"):
        obj["model"].pop(option, None)
    obj["pre_tokenizer"].pop("use_regex", None)
    obj["truncation"] = {"max_length": 16, "strategy": "LongestFirst", "stride": 0}
    obj["decoder"] = None  # decoding never changes the ids a text encodes to


def test_serialisation_and_decoder_do_not_count(base: Path, tmp_path: Path) -> None:
    other = variant(base, tmp_path, "old")
    edit_json(other / "tokenizer.json", old_serialisation)
    assert encode(other) == encode(base)
    assert tokenizer_fingerprint(other) == tokenizer_fingerprint(base)


def swap_two_merges(obj: dict[str, Any]) -> None:
    merges = obj["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]


def drop_first_merge(obj: dict[str, Any]) -> None:
    del obj["model"]["merges"][0]


def swap_token_ids(obj: dict[str, Any], a: int = 100, b: int = 101) -> None:
    vocab = obj["model"]["vocab"]
    token_a, token_b = (next(t for t, i in vocab.items() if i == n) for n in (a, b))
    vocab[token_a], vocab[token_b] = b, a


def unspecial_added_token(obj: dict[str, Any]) -> None:
    obj["added_tokens"][-1]["special"] = False


def lowercase(obj: dict[str, Any]) -> None:
    obj["normalizer"] = {
        "type": "Sequence",
        "normalizers": [obj["normalizer"], {"type": "Lowercase"}],
    }


def prefix_space(obj: dict[str, Any]) -> None:
    obj["pre_tokenizer"]["add_prefix_space"] = True


def no_bos(obj: dict[str, Any]) -> None:
    obj["post_processor"] = None


def add_bos_in_config(obj: dict[str, Any]) -> None:
    obj["add_bos_token"] = False


def extra_added_token(obj: dict[str, Any]) -> None:
    obj["added_tokens_decoder"] = {
        "400": {
            "content": "<|tool|>",
            "special": True,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
    }


CHANGES = {
    "tokenizer.json": [
        swap_two_merges,
        drop_first_merge,
        swap_token_ids,
        unspecial_added_token,
        lowercase,
        prefix_space,
        no_bos,
    ],
    "tokenizer_config.json": [add_bos_in_config, extra_added_token],
}


@pytest.mark.parametrize(
    ("file", "change"),
    [(f, c) for f, cs in CHANGES.items() for c in cs],
    ids=lambda x: str(getattr(x, "__name__", x)),
)
def test_a_change_to_the_ids_is_a_new_fingerprint(
    base: Path, tmp_path: Path, file: str, change: Any
) -> None:
    other = variant(base, tmp_path, "changed")
    edit_json(other / file, change)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(base)


@pytest.mark.parametrize("change", ["merge", "token", "normaliser", "post-processor"])
def test_changes_that_count_do_change_ids(base: Path, tmp_path: Path, change: str) -> None:
    """Such changes are real ones: transformers encodes the samples differently."""
    before = encode(base)
    first = before[0][1]  # the first id after bos: swapping it with its neighbour shows
    edits = {
        "merge": drop_first_merge,
        "token": lambda obj: swap_token_ids(obj, first, first + 1),
        "normaliser": lowercase,
        "post-processor": no_bos,
    }
    other = variant(base, tmp_path, "changed")
    edit_json(other / "tokenizer.json", edits[change])
    assert encode(other) != before
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(base)


def test_the_fingerprint_records_the_tokenizer_size(base: Path, tmp_path: Path) -> None:
    fp = tokenizer_fingerprint(base)
    loaded = AutoTokenizer.from_pretrained(str(base))
    assert fp.startswith("tok2:") and not is_legacy_fingerprint(fp)
    assert fingerprint_tokenizer_size(fp) == tokenizer_size(base) == len(loaded)
    assert short_fingerprint(fp) == f"tok2:{len(loaded)}:{fp.rsplit(':', 1)[1][:16]}"
    # an added token with an id past the vocabulary raises the size to that id + 1
    other = variant(base, tmp_path, "more")
    edit_json(other / "tokenizer_config.json", extra_added_token)
    assert tokenizer_size(other) == 401
    assert fingerprint_tokenizer_size(legacy_tokenizer_fingerprint(base)) is None
    assert fingerprint_tokenizer_size("tok2:x:abc") is None


def test_a_space_of_either_kind_is_matched(base: Path, tmp_path: Path) -> None:
    other = variant(base, tmp_path, "instruct")
    same_tokenisation_files(other)
    new, old = tokenizer_fingerprint(base), legacy_tokenizer_fingerprint(base)
    assert is_legacy_fingerprint(old)
    assert fingerprint_matches(new, base) and fingerprint_matches(new, other)
    assert fingerprint_matches(old, base) and fingerprint_matches(old.upper(), base)
    assert not fingerprint_matches(old, other)  # file bytes: only the very same files


def test_chat_template_fingerprint(base: Path, tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat_template_fingerprint(base) is None
    in_config = variant(base, tmp_path, "config")
    edit_json(in_config / "tokenizer_config.json", lambda o: o.update(chat_template=template))
    as_file = variant(base, tmp_path, "file")
    (as_file / "chat_template.jinja").write_text(template)
    saved = tmp_path / "saved"
    loaded = AutoTokenizer.from_pretrained(str(base))
    loaded.chat_template = template
    loaded.save_pretrained(saved)
    fp = chat_template_fingerprint(in_config)
    assert fp is not None and fp.startswith("chat1:")
    assert chat_template_fingerprint(as_file) == fp == chat_template_fingerprint(saved)
    (as_file / "chat_template.jinja").write_text(template + "\n")
    assert chat_template_fingerprint(as_file) != fp
    named = [{"name": "default", "template": template}, {"name": "tool_use", "template": "x"}]
    edit_json(in_config / "tokenizer_config.json", lambda o: o.update(chat_template=named))
    assert chat_template_fingerprint(in_config) not in (None, fp)
    assert tokenizer_fingerprint(in_config) == tokenizer_fingerprint(base)


# --- tokenizers without tokenizer.json -------------------------------------------------------------


def test_slow_bpe_files(base: Path, tmp_path: Path) -> None:
    """vocab.json + merges.txt (GPT-2 style): the merges count in order, their header does not."""
    model = json.loads((base / "tokenizer.json").read_text())["model"]
    merges = [" ".join(pair) for pair in model["merges"]]

    def write(name: str, merge_lines: list[str], header: bool) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "vocab.json").write_text(json.dumps(model["vocab"]))
        (path / "merges.txt").write_text(
            ("#version: 0.2\n" if header else "") + "\n".join(merge_lines) + "\n"
        )
        (path / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "GPT2Tokenizer"})
        )
        return path

    one = write("one", merges, header=True)
    assert tokenizer_fingerprint(write("two", merges, header=False)) == tokenizer_fingerprint(one)
    swapped = [merges[1], merges[0], *merges[2:]]
    assert tokenizer_fingerprint(write("three", swapped, header=True)) != tokenizer_fingerprint(one)
    assert tokenizer_size(one) == len(model["vocab"])
    fast_class = write("four", merges, header=True)
    (fast_class / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2TokenizerFast", "chat_template": "{{ x }}"})
    )
    assert tokenizer_fingerprint(fast_class) == tokenizer_fingerprint(one)
    # a fast and a slow copy of one tokenizer are different kinds: they do not match
    assert tokenizer_fingerprint(one) != tokenizer_fingerprint(base)


def train_sentencepiece(vocab_size: int) -> bytes:
    spm = pytest.importorskip("sentencepiece")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        minloglevel=2,
    )
    return out.getvalue()


def test_sentencepiece_only(tmp_path: Path) -> None:
    spm = pytest.importorskip("sentencepiece")

    def write(name: str, model: bytes, config: dict[str, Any]) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "tokenizer.model").write_bytes(model)
        (path / "tokenizer_config.json").write_text(json.dumps(config))
        return path

    model = train_sentencepiece(40)
    llama = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}
    one = write("one", model, llama)
    two = write("two", model, {**llama, "chat_template": "{{ m }}", "model_max_length": 4096})
    assert tokenizer_fingerprint(one) == tokenizer_fingerprint(two)
    assert tokenizer_size(one) == spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    assert tokenizer_fingerprint(write("three", train_sentencepiece(45), llama)) != (
        tokenizer_fingerprint(one)
    )
    assert tokenizer_fingerprint(write("four", model, {**llama, "add_bos_token": False})) != (
        tokenizer_fingerprint(one)
    )
    (one / "added_tokens.json").write_text(json.dumps({"<pad>": 40}))
    assert tokenizer_size(one) == 41 and tokenizer_fingerprint(one) != tokenizer_fingerprint(two)
    broken = write("broken", model[:-3], llama)
    with pytest.raises(InvalidArgument, match="not a sentencepiece model"):
        tokenizer_fingerprint(broken)


def test_missing_and_unreadable_tokenizers_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not a directory"):
        tokenizer_fingerprint(tmp_path / "absent")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(InvalidArgument, match="no tokenizer files"):
        tokenizer_fingerprint(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        tokenizer_fingerprint(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(InvalidArgument, match="no tokenizer model"):
        tokenizer_fingerprint(tmp_path)


# --- the file-bytes fingerprint of spaces written earlier ----------------------------------------

# Computed by the server's fingerprint function before it moved into the client
# (logitcache.server.teachers.identity at 6b58e8d) on the directories written below. Every capture
# space written before tok2 records such a value, and a trainer checks against it.
EVERY_FILE_FINGERPRINT = "8c5e5732102f5e028f2ca8e31728ae6e08f2435701f6590622b17b6bf7cd85f0"
ONE_FILE_FINGERPRINT = "bffa1302db90dbe95987b4f5bdf2a46059434b81eb347ca180929176b2a8e31d"


def write_every_file(path: Path) -> Path:
    """One file of each kind: JSON (non-ASCII, indented), JSON that does not parse, binary, text."""
    path.mkdir()
    vocab = {"[UNK]": 0, "é": 1, "ab": 2, "a": 3, "b": 4}
    tok = {
        "version": "1.0",
        "model": {"type": "BPE", "vocab": vocab, "merges": ["a b"]},
        "added_tokens": [],
    }
    (path / "tokenizer.json").write_text(json.dumps(tok, indent=2, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text('{"model_max_length": 512, "bos_token": null}')
    (path / "special_tokens_map.json").write_text("{not json")
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\na b\n")
    (path / "tokenizer.model").write_bytes(bytes(range(256)))
    (path / "config.json").write_text('{"ignored": true}')
    return path


def test_legacy_fingerprints_keep_their_stored_values(tmp_path: Path) -> None:
    every = write_every_file(tmp_path / "every")
    assert legacy_tokenizer_fingerprint(every) == EVERY_FILE_FINGERPRINT
    one = tmp_path / "one"
    one.mkdir()
    (one / "tokenizer.json").write_text('{\n  "a": [1,   2],\n  "b": 1\n}\n')  # canonical JSON
    assert legacy_tokenizer_fingerprint(str(one)) == ONE_FILE_FINGERPRINT


@pytest.mark.parametrize("name", LEGACY_TOKENIZER_FILES)
def test_every_legacy_file_counts(tmp_path: Path, name: str) -> None:
    path = write_every_file(tmp_path / "tok")
    (path / name).write_bytes((path / name).read_bytes() + b" x")
    assert legacy_tokenizer_fingerprint(path) != EVERY_FILE_FINGERPRINT
    (path / name).unlink()
    (path / "model.safetensors").write_bytes(b"weights")
    assert legacy_tokenizer_fingerprint(path) != EVERY_FILE_FINGERPRINT


def test_legacy_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not a directory"):
        legacy_tokenizer_fingerprint(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidArgument, match="no tokenizer files"):
        legacy_tokenizer_fingerprint(tmp_path)
