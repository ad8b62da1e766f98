"""logitcache.client: the data model (records, codecs) and the client side of the service."""

from logitcache.client.record import Record
from logitcache.client.use import Use

__all__ = ["AsyncClient", "Client", "Record", "ScoredIds", "Use"]


def __getattr__(name: str):
    # The gRPC clients load grpc and the stubs on first use, so the data model stays light.
    if name in ("Client", "AsyncClient", "ScoredIds"):
        from logitcache.client import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
