"""Where a store's bytes live. A store URL picks the backend; everything above talks to this.

The store needs very little from its backend: small JSON documents replaced atomically, a zarr
store rooted at the store URL, listing, and one atomic "seal" that publishes a fully written
directory under its final name. A local file system does that with rename.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlparse

from zarr.storage import LocalStore

from logitcache.client.errors import InvalidArgument, NotFound


class LocalStorage:
    """A store on a local or shared POSIX file system."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def zarr_store(self, rel: str, *, read_only: bool) -> LocalStore:
        """A zarr store rooted at ``rel``, so each group is self-contained and movable."""
        return LocalStore(self.root / rel, read_only=read_only)

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def read_json(self, rel: str) -> dict:
        with open(self.path(rel), encoding="utf-8") as f:
            return json.load(f)

    def write_json(self, rel: str, obj: dict) -> None:
        """Replace a JSON document atomically: readers see the old or the new one, never half."""
        target = self.path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)

    def list_dir(self, rel: str) -> list[str]:
        p = self.path(rel)
        if not p.is_dir():
            return []
        return sorted(e.name for e in p.iterdir())

    def make_dirs(self, rel: str) -> None:
        self.path(rel).mkdir(parents=True, exist_ok=True)

    def seal(self, src_rel: str, dst_rel: str) -> None:
        """Publish a fully written directory under its final name, atomically and create-only."""
        src, dst = self.path(src_rel), self.path(dst_rel)
        for f in src.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            raise FileExistsError(f"{dst_rel} already exists")
        os.rename(src, dst)
        dir_fd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def modified_at(self, rel: str) -> float:
        return self.path(rel).stat().st_mtime

    def remove_tree(self, rel: str) -> None:
        shutil.rmtree(self.path(rel), ignore_errors=True)

    def disk_usage(self, rel: str = "") -> int:
        p = self.path(rel)
        if p.is_file():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def storage_for_url(url: str, *, create: bool) -> LocalStorage:
    """Pick the backend for a store URL: a path or ``file://`` URL."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        root = Path(parsed.path if parsed.scheme == "file" else url).expanduser().resolve()
    elif len(parsed.scheme) == 1:  # a Windows drive letter
        root = Path(url).resolve()
    else:
        raise InvalidArgument(
            f"store URL {url!r}: scheme {parsed.scheme!r} is not supported by this version "
            "(use a local path or file:// URL)"
        )
    if not root.exists():
        if not create:
            raise NotFound(f"store {url!r} does not exist")
        root.mkdir(parents=True)
    elif not root.is_dir():
        raise InvalidArgument(f"store {url!r} is not a directory")
    return LocalStorage(root)
