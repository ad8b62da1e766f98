"""logitcache: a teacher-logit cache for knowledge distillation.

``open_store(url)`` opens a store read-only; ``store.dataset(name)[i]`` and ``store.get(key)``
return :class:`Record` objects.
"""

from logitcache.client.record import Record

__version__ = "0.1.0"


def open_store(url: str):
    """Open a logitcache store (a local path or file:// URL) read-only."""
    from logitcache.server.store.store import open_store as _open

    return _open(url)


__all__ = ["Record", "open_store", "__version__"]
