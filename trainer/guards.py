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


def _student_fingerprint(tokenizer_path: str | Path, recorded: str) -> str:
    """The student's tokenizer fingerprint, of the kind the space ``recorded``.

    Spaces written before ``tok2`` hold a fingerprint of file bytes; the student's is then taken
    the same way, so an old space still opens for the very same files.
    """
    try:
        if tokenizer.is_legacy_fingerprint(recorded):
            return tokenizer.legacy_tokenizer_fingerprint(tokenizer_path)
        return tokenizer.tokenizer_fingerprint(tokenizer_path)
    except (NotFound, InvalidArgument) as e:
        raise IncompatibleStudent(
            f"student tokenizer: {e}; pass the local directory that holds tokenizer.json / "
            "tokenizer_config.json, or tokenizer_fingerprint=..."
        ) from e


def _size_of(tokenizer_path: str | Path) -> int | None:
    """The size of a tokenizer that matched an old space; None if its files cannot say."""
    try:
        return tokenizer.tokenizer_size(tokenizer_path)
    except (NotFound, InvalidArgument):
        return None


def _legacy_hint(recorded: str) -> str:
    """How to check a student against a space that records a file-bytes fingerprint."""
    if not tokenizer.is_legacy_fingerprint(recorded):
        return ""
    return (
        ". This space was written before tokenizer fingerprints tok2 and records a hash of the "
        "teacher's tokenizer file bytes, so any file difference (a chat template, "
        "model_max_length) refuses. If you have the teacher's tokenizer directory T, check that "
        "logitcache.client.tokenizer.fingerprint_matches(space.tokenizer_fingerprint, T) and "
        "tokenizer_fingerprint(T) == tokenizer_fingerprint(student directory), then pass "
        "tokenizer_fingerprint=space.tokenizer_fingerprint"
    )


def _vocab_problem(
    student: int, teacher: int, tokenizer_size: int | None, allow_vocab_padding: bool
) -> str | None:
    """Why a student with ``student`` output rows cannot learn from a ``teacher``-row space.

    The rule: the student needs a row for every id the tokenizer can produce. A teacher padded
    beyond its tokenizer (``tokenizer_size`` < ``teacher``) so also teaches any student with at
    least ``tokenizer_size`` rows: what it stores on ids the student lacks is padding, folded
    into the tail by ``Collator(vocab_size=student)``. A student larger than the teacher needs
    ``allow_vocab_padding`` to say its extra rows are padding.
    """
    if student == teacher or (allow_vocab_padding and student > teacher):
        return None
    if tokenizer_size is not None and tokenizer_size <= student < teacher:
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
    if tokenizer_size is None:
        rule = (
            "a smaller student needs at least the tokenizer's size, which this space does not "
            "record (its tokenizer fingerprint predates tok2): pass tokenizer_path= so it is "
            "read from the student's tokenizer"
        )
    else:
        rule = (
            f"a student needs a row for every id the tokenizer can produce, {tokenizer_size} "
            f"(ids 0..{tokenizer_size - 1}); teacher rows {tokenizer_size}..{teacher - 1} are "
            "padding"
        )
    return (
        f"student vocabulary {student} != teacher vocabulary {teacher} (student has {diff} fewer "
        f"rows: teacher ids {student}..{teacher - 1} would be out of range; {rule}){hint}"
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
      ``space.tokenizer_fingerprint``. It hashes what decides the ids (see
      :mod:`logitcache.client.tokenizer`), so a chat template or ``model_max_length`` does not
      count. Spaces written before ``tok2`` record file bytes: the message says how to check
      those.
    - Vocabulary: ``vocab_size`` is the student's *output* size (``lm_head.out_features``, or
      ``model.config.vocab_size``) and must equal ``space.vocab_size``, with two exceptions. A
      teacher padded beyond its tokenizer (e.g. 152,064 rows for 151,665 ids) teaches any
      student with at least the tokenizer's size; collate with ``Collator(vocab_size=...)`` to
      fold the teacher's entries on the student's missing ids into the tail. And with
      ``allow_vocab_padding=True`` a larger student (embedding rows padded to a multiple of 64 or
      128) is accepted. The tokenizer's size comes from the space's fingerprint, or from
      ``tokenizer_path`` for spaces written before ``tok2``.

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
    teacher_fp = space.tokenizer_fingerprint
    tokenizer_size = tokenizer.fingerprint_tokenizer_size(teacher_fp)

    if tokenizer_path is not None or tokenizer_fingerprint is not None:
        student_fp = (
            _student_fingerprint(tokenizer_path, teacher_fp)
            if tokenizer_path is not None
            else str(tokenizer_fingerprint)
        )
        if student_fp.strip().lower() != teacher_fp.strip().lower():
            source = f" ({str(tokenizer_path)!r})" if tokenizer_path is not None else ""
            problems.append(
                f"student tokenizer {tokenizer.short_fingerprint(student_fp)}{source} != teacher "
                f"tokenizer {tokenizer.short_fingerprint(teacher_fp)}: distillation from this "
                "cache needs the teacher's tokenizer (the cached rows are teacher token ids, "
                f"which name other strings in another tokenizer){_legacy_hint(teacher_fp)}"
            )
        elif tokenizer_size is None and tokenizer_path is not None:
            tokenizer_size = _size_of(tokenizer_path)

    if vocab_size is not None:
        if isinstance(vocab_size, bool) or int(vocab_size) != vocab_size or vocab_size < 1:
            raise TypeError(f"vocab_size must be a positive int, got {vocab_size!r}")
        problem = _vocab_problem(
            int(vocab_size), int(space.vocab_size), tokenizer_size, allow_vocab_padding
        )
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
                    f"[0, {vocab_size}) (range in this record: {lo}..{hi}; teacher ids on the "
                    "padding rows of a padded teacher are folded by Collator(vocab_size=...))"
                )
