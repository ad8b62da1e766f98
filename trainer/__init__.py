"""logitcache.trainer: streaming cached teacher distributions into PyTorch student training."""
