"""logitcache.server: engine adapter (vLLM), store, precompute jobs and the service."""
