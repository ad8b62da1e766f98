"""Refusing a student that cannot be distilled from a cache: wrong tokenizer, wrong vocabulary.

A cached row names the teacher's next-token candidates by *token id*. Those ids mean something to
a student only if it uses the teacher's tokenizer (ARCHITECTURE.md, "Capture space": a trainer
whose tokenizer fingerprint differs from the space's is refused), and the student's output layer
must have a logit for every id the teacher could have listed. Call :func:`check_student` once
before training; :func:`check_record_ids` is a cheap per-batch check of the ids themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from logitcache.client import tokenizer  # the module: an argument below is tokenizer_fingerprint
from logitcache.client.errors import FailedPrecondition, InvalidArgument, NotFound
from logitcache.client.record import Record
from logitcache.client.space import CaptureSpace

__all__ = ["IncompatibleStudent", "check_record_ids", "check_student"]


class IncompatibleStudent(FailedPrecondition, ValueError):
    """The student cannot be trained on this cache; the message says why and what to do.

    A ValueError as well, as it was before the shared error vocabulary existed.
    """


def _student_fingerprint(tokenizer_path: str | Path) -> str:
    """The student's tokenizer fingerprint, hashed exactly as the server hashes the teacher's."""
    try:
        return tokenizer.tokenizer_fingerprint(tokenizer_path)
    except (NotFound, InvalidArgument) as e:
        raise IncompatibleStudent(
            f"student tokenizer: {e}; pass the local directory that holds tokenizer.json / "
            "tokenizer_config.json, or tokenizer_fingerprint=..."
        ) from e


def _vocab_problem(student: int, teacher: int, allow_vocab_padding: bool) -> str | None:
    if student == teacher or (allow_vocab_padding and student > teacher):
        return None
    diff = abs(student - teacher)
    if student > teacher:
        return (
            f"student vocabulary {student} != teacher vocabulary {teacher} (student has {diff} "
            f"more rows: embedding padding? if rows {teacher}..{student - 1} are padding, pass "
            "allow_vocab_padding=True: teacher ids are all below the teacher vocabulary, and the "
            "extra student logits only count in the tail bucket)"
        )
    hint = " (allow_vocab_padding only accepts a larger student)" if allow_vocab_padding else ""
    return (
        f"student vocabulary {student} != teacher vocabulary {teacher} (student has {diff} fewer "
        f"rows: teacher ids {student}..{teacher - 1} would be out of range){hint}"
    )


def check_student(
    space: CaptureSpace,
    *,
    tokenizer_path: str | Path | None = None,
    tokenizer_fingerprint: str | None = None,
    vocab_size: int | None = None,
    allow_vocab_padding: bool = False,
) -> None:
    """Raise :class:`IncompatibleStudent` unless the student can be distilled from ``space``.

    - Tokenizer: the fingerprint of ``tokenizer_path`` (the student's tokenizer directory, hashed
      exactly as the server hashes the teacher's) or a given ``tokenizer_fingerprint`` must equal
      ``space.tokenizer_fingerprint``. Pass the directory the tokenizer files came from: a
      tokenizer re-saved by another library version may serialise differently and not match.
    - Vocabulary: ``vocab_size`` is the student's *output* size (``lm_head.out_features``, or
      ``model.config.vocab_size``) and must equal ``space.vocab_size``. With
      ``allow_vocab_padding=True`` a larger student (embedding rows padded to a multiple of 64 or
      128) is accepted; a smaller one never is.

    At least one of the two checks must be asked for. All problems are reported in one error.
    """
    if tokenizer_path is not None and tokenizer_fingerprint is not None:
        raise TypeError("pass tokenizer_path or tokenizer_fingerprint, not both")
    if tokenizer_path is None and tokenizer_fingerprint is None and vocab_size is None:
        raise TypeError(
            "check_student: nothing to check (pass tokenizer_path or tokenizer_fingerprint, "
            "and vocab_size)"
        )
    problems: list[str] = []

    if tokenizer_path is not None or tokenizer_fingerprint is not None:
        student_fp = (
            _student_fingerprint(tokenizer_path)
            if tokenizer_path is not None
            else str(tokenizer_fingerprint)
        )
        teacher_fp = space.tokenizer_fingerprint
        if student_fp.strip().lower() != teacher_fp.strip().lower():
            source = f" ({str(tokenizer_path)!r})" if tokenizer_path is not None else ""
            problems.append(
                f"student tokenizer {student_fp[:16]}{source} != teacher tokenizer "
                f"{teacher_fp[:16]}: distillation from this cache needs the teacher's tokenizer "
                "(the cached rows are teacher token ids, which name other strings in another "
                "tokenizer)"
            )

    if vocab_size is not None:
        if isinstance(vocab_size, bool) or int(vocab_size) != vocab_size or vocab_size < 1:
            raise TypeError(f"vocab_size must be a positive int, got {vocab_size!r}")
        problem = _vocab_problem(int(vocab_size), int(space.vocab_size), allow_vocab_padding)
        if problem is not None:
            problems.append(problem)

    if problems:
        raise IncompatibleStudent(
            f"student incompatible with capture space {space.space_id}: " + "; ".join(problems)
        )


def check_record_ids(records: Iterable[Record], vocab_size: int) -> None:
    """Raise :class:`IncompatibleStudent` if any id in ``records`` is outside ``[0, vocab_size)``.

    Checks the input ids and the teacher's listed ids; entries of ragged rows whose log-prob is
    -inf are padding and may hold any id. One vectorised reduction per record.
    """
    if isinstance(records, Record):
        records = (records,)
    for rec in records:
        valid = rec.logprobs > -np.inf  # False for -inf padding and NaN
        listed = rec.token_ids[valid]
        for what, ids in (("input id", rec.input_ids), ("teacher id", listed)):
            if ids.size == 0:
                continue
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= vocab_size:
                bad = hi if hi >= vocab_size else lo
                raise IncompatibleStudent(
                    f"record {rec.key[:16]}: {what} {bad} outside the student vocabulary "
                    f"[0, {vocab_size}) (range in this record: {lo}..{hi})"
                )
