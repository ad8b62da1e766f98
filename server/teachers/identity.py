"""Finding a teacher and fingerprinting it: which weights and which tokenizer produced a capture.

A teacher is named by a local directory or a Hugging Face model id. Before any engine starts we
check that it exists and is a causal LM, and read what the capture space needs (vocabulary size,
context length) from its config, so bad input is reported in a second, not after engine start-up.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from logitcache.client.errors import InvalidArgument, NotFound
from logitcache.client.space import CaptureMode, CaptureSpace
from logitcache.client.tokenizer import (
    canonical_json,
    chat_template_fingerprint,
    legacy_tokenizer_fingerprint,
    tokenizer_fingerprint,
)
from logitcache.server.engine.capture import CaptureConfig
from logitcache.server.policy.licences import model_card_licence_of
from logitcache.server.teachers.hub import download_teacher

# Weight files up to this total are hashed completely; bigger teachers are fingerprinted by
# file sizes plus sampled blocks, which detects any re-upload or conversion in practice while
# keeping start-up fast for multi-hundred-GB checkpoints.
FULL_HASH_LIMIT = 4 << 30
_SAMPLE_BLOCKS = 64
_BLOCK = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass(frozen=True)
class TeacherInfo:
    """What the capture space and the input checks need to know about a teacher."""

    name: str  # as given by the user
    path: Path  # local directory with config and weights
    architecture: str
    vocab_size: int
    max_model_len: int
    native_dtype: str | None  # the checkpoint's dtype, as its config declares it
    teacher_fingerprint: str
    tokenizer_fingerprint: str
    license: str | None  # as its model card declares it (the YAML front matter's license:)
    # For provenance and for spaces written before tok2 fingerprints (which record this value).
    legacy_tokenizer_fingerprint: str | None = None
    chat_template_fingerprint: str | None = None
    revision: str | None = None  # hub teachers: the commit fetched (provenance); None: a directory

    def tokenizer_matches(self, recorded: str) -> bool:
        """Whether a space's recorded tokenizer fingerprint, of either kind, is this teacher's."""
        return recorded in (self.tokenizer_fingerprint, self.legacy_tokenizer_fingerprint)


def topk_space(info: TeacherInfo, engine_dtype: str, k: int) -> CaptureSpace:
    """The capture space of top-k rows from this teacher, run in ``engine_dtype``."""
    return capture_space(info, engine_dtype, CaptureConfig(CaptureMode.TOPK, k))


def capture_space(info: TeacherInfo, engine_dtype: str, config: CaptureConfig) -> CaptureSpace:
    """The capture space of ``config`` captures from this teacher, run in ``engine_dtype``."""
    return config.space(
        info.teacher_fingerprint, info.tokenizer_fingerprint, info.vocab_size, engine_dtype
    )


def resolve_teacher(
    name_or_path: str, revision: str | None = None, download_dir: str | None = None
) -> TeacherInfo:
    """Locate a teacher (a hub id at ``revision``, cached in ``download_dir``) and fingerprint
    it; raise a typed error with a one-line reason (see :mod:`.hub` for the hub's)."""
    path, commit = _local_path(name_or_path, revision, download_dir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InvalidArgument(f"teacher {name_or_path!r}: no config.json in {path}")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise InvalidArgument(
            f"teacher {name_or_path!r}: config.json is not valid JSON ({e})"
        ) from None
    architectures = config.get("architectures") or []
    causal = [a for a in architectures if a.endswith("ForCausalLM")]
    if not causal:
        raise InvalidArgument(
            f"teacher {name_or_path!r} is not a causal language model "
            f"(architectures: {architectures or 'none'})"
        )
    text_config = config.get("text_config", config)
    vocab_size = int(text_config.get("vocab_size", 0))
    max_len = int(text_config.get("max_position_embeddings", 0))
    if vocab_size <= 0 or max_len <= 0:
        raise InvalidArgument(
            f"teacher {name_or_path!r}: config lacks vocab_size or max_position_embeddings"
        )
    return TeacherInfo(
        name=name_or_path,
        path=path,
        architecture=causal[0],
        vocab_size=vocab_size,
        max_model_len=max_len,
        native_dtype=text_config.get("torch_dtype")
        or text_config.get("dtype")
        or config.get("torch_dtype"),
        teacher_fingerprint=weights_fingerprint(path),
        tokenizer_fingerprint=tokenizer_fingerprint(path),
        license=model_card_licence_of(path),
        legacy_tokenizer_fingerprint=_legacy_fingerprint(path),
        chat_template_fingerprint=chat_template_fingerprint(path),
        revision=commit,
    )


def _legacy_fingerprint(path: Path) -> str | None:
    """The pre-tok2 fingerprint that older spaces record; None where its files are absent."""
    try:
        return legacy_tokenizer_fingerprint(path)
    except InvalidArgument:
        return None


def _local_path(
    name_or_path: str, revision: str | None, download_dir: str | None
) -> tuple[Path, str | None]:
    """The teacher's directory, and the hub commit it was fetched at (None for a directory)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InvalidArgument(f"teacher {name_or_path!r} is a file; expected a model directory")
        if revision is not None:
            raise InvalidArgument(
                f"teacher {name_or_path!r} is a directory; a revision applies to hub ids only"
            )
        return path.resolve(), None
    looks_like_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_id:
        raise NotFound(f"teacher {name_or_path!r}: no such directory")
    snapshot = download_teacher(name_or_path, revision, download_dir)
    return snapshot, snapshot.name  # the hub cache names a snapshot by its commit


def weights_fingerprint(path: Path) -> str:
    """sha256 over config.json and the weight files (complete, or sampled for huge teachers)."""
    files = sorted(f for f in path.iterdir() if f.suffix in _WEIGHT_SUFFIXES and f.is_file())
    if not files:
        raise InvalidArgument(
            f"teacher {str(path)!r}: no weight files ({', '.join(_WEIGHT_SUFFIXES)})"
        )
    h = hashlib.sha256()
    h.update(canonical_json(path / "config.json"))
    total = sum(f.stat().st_size for f in files)
    sampled = total > FULL_HASH_LIMIT
    h.update(b"sampled" if sampled else b"full")
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if not sampled:
                for block in iter(lambda: fh.read(_BLOCK * 8), b""):
                    h.update(block)
            else:
                for j in range(_SAMPLE_BLOCKS):
                    fh.seek(max(0, size - _BLOCK) * j // max(1, _SAMPLE_BLOCKS - 1))
                    h.update(fh.read(_BLOCK))
    return h.hexdigest()
