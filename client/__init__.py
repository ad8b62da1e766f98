"""logitcache.client: the data model (records, codecs) and the client side of the service."""

from logitcache.client.record import Record

__all__ = ["Record"]
