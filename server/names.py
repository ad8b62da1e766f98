"""Names that requests carry (datasets, teachers, jobs): how messages show them.

A name comes from a client and may be anything, up to the size of a message: a message that
names it shows a short, printable prefix (``repr`` escapes newlines and control characters), so
an error never echoes a megabyte back, nor a name that looks like another one.
"""

from __future__ import annotations

SHOWN_CHARS = 64


def shown(name: str) -> str:
    """``name`` as an error message quotes it: its repr, cut to :data:`SHOWN_CHARS`."""
    if len(name) <= SHOWN_CHARS:
        return repr(name)
    return f"{name[:SHOWN_CHARS]!r}... ({len(name)} characters)"
