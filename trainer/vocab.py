"""Students with fewer output rows than a padded teacher: the teacher's padding ids fold away.

Many teachers pad their output layer beyond their tokenizer (Qwen2.5-7B has 152,064 rows for
151,665 ids), so a capture space's ``vocab_size`` can exceed what the tokenizer produces, and a
student of the same family may have fewer rows than the teacher (Qwen2.5-0.5B: 151,936). The
guard accepts such a student when it has a row for every id the tokenizer can produce
(:func:`logitcache.trainer.guards.check_student`). The teacher may still have stored entries on
ids the student lacks, the padding rows, which hold (almost) no mass. Collation folds them into
the teacher's tail, where the student's own bucket for "everything else" meets them, and counts
them in each batch, so a teacher that is not padding there shows up instead of vanishing.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["FOLDED_ENTRIES", "FOLDED_MASS", "NOTICEABLE_MASS", "fold_padding_ids"]

FOLDED_ENTRIES = "teacher_folded_entries"
"""Batch field: how many teacher entries were folded into the tail (int64, a scalar)."""

FOLDED_MASS = "teacher_folded_mass"
"""Batch field: the most teacher probability folded at any one position (float32, a scalar)."""

NOTICEABLE_MASS = 1e-3
"""Folded mass above this at a position is more than padding noise: it is warned about."""

_ENTRY_FIELDS = ("teacher_token_ids", "teacher_logprobs", "teacher_counts")


def fold_padding_ids(arrays: dict[str, np.ndarray], vocab_size: int) -> None:
    """Fold the teacher entries on ids >= ``vocab_size`` of a collated batch into its tail.

    In place, on the fields of :mod:`logitcache.trainer.collate`: each such entry becomes padding
    (id 0, log-prob -inf, count 0) at the end of its row, so rows stay in descending order. Its
    probability joins ``teacher_tail_logprobs`` where the record stores a tail; where it does
    not (NaN), the losses derive the tail from the remaining entries, which already leaves it
    out. Sampled rows have no tail: their draws of such ids are dropped. Adds
    :data:`FOLDED_ENTRIES` and :data:`FOLDED_MASS` to ``arrays``.
    """
    ids, logprobs = arrays["teacher_token_ids"], arrays["teacher_logprobs"]
    counts = arrays.get("teacher_counts")
    present = counts > 0 if counts is not None else logprobs > -np.inf
    folded = present & (ids >= vocab_size)
    entries = int(folded.sum())
    largest = 0.0
    if entries:
        mass = np.where(folded, np.exp(logprobs.astype(np.float64)), 0.0).sum(axis=-1)
        largest = float(mass.max())
        tail = arrays["teacher_tail_logprobs"]
        stored = ~np.isnan(tail) & (mass > 0)
        tail[stored] = np.logaddexp(tail[stored], np.log(mass[stored]))
        order = np.argsort(folded, axis=-1, kind="stable")  # folded entries last, others in order
        for name in _ENTRY_FIELDS:
            if name in arrays:
                arrays[name][...] = np.take_along_axis(arrays[name], order, axis=-1)
        folded = np.take_along_axis(folded, order, axis=-1)
        ids[folded] = 0
        logprobs[folded] = -np.inf
        if counts is not None:
            counts[folded] = 0
        if largest > NOTICEABLE_MASS:
            warnings.warn(
                f"the teacher put up to {largest:.3g} of a position's probability on ids >= "
                f"{vocab_size}, which the student lacks; folded into the tail. A padded "
                "teacher's padding rows should hold almost none: check that ids from "
                f"{vocab_size} up are padding, or give the student those rows",
                RuntimeWarning,
                stacklevel=2,
            )
    arrays[FOLDED_ENTRIES] = np.array(entries, dtype=np.int64)
    arrays[FOLDED_MASS] = np.array(largest, dtype=np.float32)
