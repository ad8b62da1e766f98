"""A small tmpfs to fill and free: real ENOSPC from the kernel, for the disk-full tests.

Mounting needs the right to mount (root, as on the CI machines); elsewhere the tests that use
it are skipped with the reason. Importable from tests in this folder.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

DISK_BYTES = 16 << 20
_CHUNK = 1 << 16


class SmallDisk:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._filler = root / "filler"

    def fill(self) -> None:
        """Take every free byte: the next write of any size fails with ENOSPC."""
        with open(self._filler, "ab", buffering=0) as f:
            for size in (_CHUNK, 4096, 1):  # then the last partial page
                try:
                    while True:
                        f.write(b"\0" * size)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)


def mounted_small_disk(where: Path) -> Iterator[SmallDisk]:
    where.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(where)]
    done = subprocess.run(mount, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield SmallDisk(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        os.rmdir(where)
