"""Confinement of ``server_path`` job inputs to the directories an admin allows.

A job names a file on the server, so without confinement a caller reads any file the server can
(a planted secrets file was read verbatim). A path is resolved with its symlinks and ``..``
before the check, so neither escapes a root, and the refusal reads the same whether or not the
path exists: the error tells a caller nothing about the server's files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from logitcache.client.errors import PermissionDenied


def confine_input(path: str, roots: Sequence[Path | str]) -> Path:
    """The resolved ``path`` when it lies inside one of ``roots``; PERMISSION_DENIED otherwise,
    or when no roots are configured (server_path inputs are then off)."""
    if not roots:
        raise PermissionDenied(
            "server_path inputs are off on this server: an admin lists the directories they may "
            "come from, or send the sequences in the request",
            fields=("server_path",),
        )
    resolved = Path(os.path.realpath(path))
    for root in roots:
        if resolved.is_relative_to(os.path.realpath(root)):
            return resolved
    raise PermissionDenied(
        "server_path is outside the directories this server allows inputs from",
        fields=("server_path",),
    )
