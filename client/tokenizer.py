"""Tokenizer identity: the fingerprint that a capture space records and a trainer must match.

Cached rows name tokens by id, so a student can learn from them only with a tokenizer that maps
every text to the same ids as the teacher's. The server fingerprints the teacher's tokenizer when
it resolves a teacher and the trainer fingerprints the student's the same way, so both sides live
here.

The fingerprint (``tok2:<size>:<sha256>``) hashes what decides the ids, in canonical form, and
nothing else:

- From ``tokenizer.json`` (what a fast tokenizer runs): the model (vocabulary, merges in order,
  its options), the normaliser, the pre-tokeniser, the post-processor, and the added tokens with
  their flags. Not the decoder: it maps ids back to text and never changes which ids a text gets,
  and the cache holds ids only. Not ``truncation`` or ``padding``: transformers sets both per
  call. Options a newer ``tokenizers`` writes with their default value hash as if absent, and
  merges hash as pairs whichever of the two serialisations the file uses.
- From ``tokenizer_config.json``: only the keys with which transformers changes the ids on top of
  those files (``CONFIG_KEYS``: bos/eos insertion, prefix space, lower-casing, ...) and the tokens
  of ``added_tokens_decoder``. A chat template, ``model_max_length``, the padding side and which
  token plays eos or pad do not count: two checkpoints of one family that differ only there
  match. The chat template is fingerprinted on its own (:func:`chat_template_fingerprint`) for
  provenance.
- A tokenizer with no ``tokenizer.json`` (a slow or sentencepiece-only one) is identified by the
  content of the files its class reads (``SLOW_FILES``: vocabulary, merges, sentencepiece model),
  its added tokens, its class (without ``Fast``) and the same config keys. The files rather than
  ``get_vocab()`` of a loaded tokenizer: a vocabulary alone misses merge order and sentencepiece
  scores, so a changed merge would match. A fast and a slow copy of one tokenizer therefore do
  not match each other; give both sides the same kind.

``<size>`` is one more than the largest id the tokenizer can produce (model vocabulary and added
tokens), which the trainer's guard needs for teachers whose output layer is padded beyond their
tokenizer. Spaces written before this fingerprint hold :func:`legacy_tokenizer_fingerprint` (file
bytes, 64 hex digits); :func:`fingerprint_matches` accepts either. Both functions must keep giving
the same answer for the same tokenizer: the values are stored in every capture space.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from logitcache.client.errors import InvalidArgument, NotFound

FINGERPRINT_VERSION = "tok2"

# tokenizer_config.json keys that change the ids transformers produces on top of the files.
CONFIG_KEYS = (
    "add_bos_token",
    "add_eos_token",
    "add_prefix_space",
    "do_lower_case",
    "from_slow",
    "legacy",
    "split_special_tokens",
    "strip_accents",
    "tokenize_chinese_chars",
)

# The files a slow tokenizer class reads its vocabulary from (sentencepiece models are binary).
SLOW_FILES = (
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)

# Options that newer `tokenizers` versions write out with these values and older ones omit.
_OPTION_DEFAULTS: dict[str, Any] = {
    "dropout": None,
    "continuing_subword_prefix": None,
    "end_of_word_suffix": None,
    "fuse_unk": False,
    "byte_fallback": False,
    "ignore_merges": False,
    "use_regex": True,
}

_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip")

# The files the file-bytes fingerprint of earlier versions hashed, in hashing order.
LEGACY_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def tokenizer_fingerprint(path: str | os.PathLike[str]) -> str:
    """``tok2:<size>:<sha256 hex>`` of the tokenizer in the directory ``path``.

    NotFound if ``path`` is not a directory, InvalidArgument if it holds no tokenizer (neither
    ``tokenizer.json`` nor one of ``SLOW_FILES``) or a tokenizer file that cannot be read.
    """
    directory = _directory(path)
    config = _read_json(directory / "tokenizer_config.json") or {}
    if not isinstance(config, dict):
        raise InvalidArgument(f"{str(directory / 'tokenizer_config.json')!r} is not a JSON object")
    fast = directory / "tokenizer.json"
    content, ids = _fast_content(fast) if fast.is_file() else _slow_content(directory, config)
    added = _added_tokens(content.pop("added_tokens"), config.get("added_tokens_decoder"))
    content["added_tokens"] = [{"id": i, **added[i]} for i in sorted(added)]
    content["config"] = {key: config[key] for key in CONFIG_KEYS if key in config}
    size = max([*ids, *added], default=-1) + 1
    digest = hashlib.sha256(_canonical(content)).hexdigest()
    return f"{FINGERPRINT_VERSION}:{size}:{digest}"


def fingerprint_tokenizer_size(fingerprint: str) -> int | None:
    """The tokenizer size a ``tok2`` fingerprint records; None for a legacy or foreign value."""
    version, _, rest = fingerprint.strip().partition(":")
    size, sep, _ = rest.partition(":")
    if version != FINGERPRINT_VERSION or not sep or not size.isdigit():
        return None
    return int(size)


def is_legacy_fingerprint(fingerprint: str) -> bool:
    """Whether ``fingerprint`` is of the file-bytes kind that spaces written earlier record."""
    return not fingerprint.strip().lower().startswith(f"{FINGERPRINT_VERSION}:")


def fingerprint_matches(recorded: str, path: str | os.PathLike[str]) -> bool:
    """Whether the tokenizer in ``path`` has the ``recorded`` fingerprint, of either kind."""
    own = (
        legacy_tokenizer_fingerprint(path)
        if is_legacy_fingerprint(recorded)
        else (tokenizer_fingerprint(path))
    )
    return own == recorded.strip().lower()


def short_fingerprint(fingerprint: str) -> str:
    """A fingerprint cut for messages: its version and size, and 16 digits of its hash."""
    head, _, digest = fingerprint.strip().rpartition(":")
    return f"{head}:{digest[:16]}" if head else digest[:16]


def tokenizer_size(path: str | os.PathLike[str]) -> int:
    """One more than the largest id the tokenizer in ``path`` can produce."""
    size = fingerprint_tokenizer_size(tokenizer_fingerprint(path))
    assert size is not None  # tokenizer_fingerprint always writes one
    return size


def chat_template_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """``chat1:<sha256 hex>`` of the chat templates a tokenizer directory ships; None if none.

    Templates come from ``chat_template.jinja``, ``additional_chat_templates/*.jinja``,
    ``chat_template.json`` and ``tokenizer_config.json`` (a string, or a list of named ones),
    hashed by name with their exact text: whitespace in a template is part of what it renders.
    """
    directory = _directory(path)
    templates: dict[str, str] = {}
    for source in (directory / "tokenizer_config.json", directory / "chat_template.json"):
        obj = _read_json(source)
        if isinstance(obj, dict):
            templates.update(_named_templates(obj.get("chat_template")))
    if (directory / "chat_template.jinja").is_file():
        templates["default"] = (directory / "chat_template.jinja").read_text()
    for f in sorted((directory / "additional_chat_templates").glob("*.jinja")):
        templates[f.stem] = f.read_text()
    if not templates:
        return None
    return "chat1:" + hashlib.sha256(_canonical(templates)).hexdigest()


def legacy_tokenizer_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) over the tokenizer files that exist in ``path``: the earlier fingerprint.

    JSON files are hashed in canonical form (sorted keys, no whitespace), every other file byte
    for byte, so any change to any of ``LEGACY_TOKENIZER_FILES`` (a chat template included)
    changes it. Kept to check a tokenizer against spaces written before ``tok2``.
    """
    directory = _directory(path)
    h = hashlib.sha256()
    found = False
    for name in LEGACY_TOKENIZER_FILES:
        f = directory / name
        if f.is_file():
            found = True
            h.update(name.encode())
            h.update(canonical_json(f) if f.suffix == ".json" else f.read_bytes())
    if not found:
        raise InvalidArgument(
            f"{str(directory)!r} holds no tokenizer files ({', '.join(LEGACY_TOKENIZER_FILES)})"
        )
    return h.hexdigest()


def canonical_json(f: Path) -> bytes:
    """The bytes of a JSON file in canonical form; a file that is not JSON, as it is."""
    try:
        return _canonical(json.loads(f.read_text()))
    except ValueError:
        return f.read_bytes()


# --- canonical content -----------------------------------------------------------------------------


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _directory(path: str | os.PathLike[str]) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise NotFound(f"{str(directory)!r} is not a directory")
    return directory


def _read_json(f: Path) -> Any:
    """The parsed file; None if it is absent; InvalidArgument if it is not JSON."""
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise InvalidArgument(f"{str(f)!r} is not valid JSON ({e})") from None


def _fast_content(f: Path) -> tuple[dict[str, Any], list[int]]:
    """The id-defining parts of a tokenizer.json, and the ids of its model's vocabulary."""
    tok = _read_json(f)
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict):
        raise InvalidArgument(f"{str(f)!r} has no tokenizer model")
    model = _without_defaults(model)
    if "merges" in model:
        model["merges"] = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    vocab = model.get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    content = {
        "kind": "tokenizer.json",
        "model": model,
        "normalizer": _without_defaults(tok.get("normalizer")),
        "pre_tokenizer": _without_defaults(tok.get("pre_tokenizer")),
        "post_processor": _without_defaults(tok.get("post_processor")),
        "added_tokens": tok.get("added_tokens") or [],
    }
    return content, [int(i) for i in ids]


def _slow_content(directory: Path, config: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """The vocabulary files of a tokenizer without tokenizer.json, and the ids they define."""
    files: dict[str, Any] = {}
    ids: list[int] = []
    for name in SLOW_FILES:
        f = directory / name
        if not f.is_file():
            continue
        if name == "vocab.json":
            vocab = _read_json(f)
            files[name] = vocab
            ids.extend(int(i) for i in vocab.values())
        elif name == "merges.txt":
            lines = f.read_text().splitlines()
            files[name] = [ln.split(" ") for ln in lines if ln and not ln.startswith("#version")]
        elif name == "vocab.txt":
            lines = f.read_text().splitlines()
            files[name] = lines
            ids.extend(range(len(lines)))
        else:
            data = f.read_bytes()
            files[name] = hashlib.sha256(data).hexdigest()
            ids.extend(range(_sentencepiece_pieces(data, f)))
    if not files:
        raise InvalidArgument(
            f"{str(directory)!r} holds no tokenizer files "
            f"(tokenizer.json, or {', '.join(SLOW_FILES)})"
        )
    added = _read_json(directory / "added_tokens.json") or {}
    content = {
        "kind": "slow",
        "class": str(config.get("tokenizer_class") or "").removesuffix("Fast"),
        "files": files,
        "added_tokens": [{"id": i, "content": c} for c, i in added.items()],
    }
    return content, ids


def _without_defaults(obj: Any) -> Any:
    """``obj`` with every option that has its default value left out, at every depth."""
    if isinstance(obj, dict):
        return {
            key: _without_defaults(value)
            for key, value in obj.items()
            if not (key in _OPTION_DEFAULTS and value == _OPTION_DEFAULTS[key])
        }
    if isinstance(obj, list):
        return [_without_defaults(v) for v in obj]
    return obj


def _added_tokens(listed: list[dict[str, Any]], decoder: Any) -> dict[int, dict[str, Any]]:
    """Added tokens by id, from tokenizer.json and added_tokens_decoder, flags made explicit.

    A token in both places counts once; tokenizer.json's entry wins, as it does in transformers.
    """
    out: dict[int, dict[str, Any]] = {}
    extra = [{**t, "id": i} for i, t in (decoder or {}).items() if isinstance(t, dict)]
    for token in [*listed, *extra]:
        i = int(token["id"])
        if i in out:
            continue
        special = bool(token.get("special", False))
        flags = {flag: bool(token.get(flag, False)) for flag in _ADDED_TOKEN_FLAGS}
        normalized = bool(token.get("normalized", not special))
        out[i] = {
            "content": token["content"],
            "special": special,
            "normalized": normalized,
            **flags,
        }
    return out


def _named_templates(value: Any) -> dict[str, str]:
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {str(t["name"]): str(t["template"]) for t in value if isinstance(t, dict)}
    return {}


def _sentencepiece_pieces(data: bytes, f: Path) -> int:
    """How many pieces a sentencepiece ModelProto holds (its repeated field 1), read off the wire.

    Avoids importing sentencepiece just to learn the size.
    """
    pieces, pos = 0, 0
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            wire = tag & 7
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 2:
                length, pos = _varint(data, pos)
                pos += length
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            else:
                raise ValueError(f"wire type {wire}")
            pieces += tag >> 3 == 1
    except (IndexError, ValueError) as e:
        raise InvalidArgument(f"{str(f)!r} is not a sentencepiece model ({e})") from None
    if pos != len(data):
        raise InvalidArgument(f"{str(f)!r} is not a sentencepiece model (truncated)")
    return pieces


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
