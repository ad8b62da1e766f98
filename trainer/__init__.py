"""logitcache.trainer: stream cached teacher distributions into PyTorch student training.

``TeacherStream`` is the dataset, ``collate`` turns records into padded batches, ``losses``
holds the sparse top-k distillation losses and ``sampled_kl``, the unbiased forward-KL estimate
from sampled rows, and ``guards`` refuses students the cache cannot teach (another tokenizer or
vocabulary).
"""

from logitcache.trainer import losses
from logitcache.trainer.losses import sampled_kl
from logitcache.trainer.stream import TeacherStream

__all__ = ["TeacherStream", "losses", "sampled_kl"]
