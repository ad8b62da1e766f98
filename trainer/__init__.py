"""logitcache.trainer: stream cached teacher distributions into PyTorch student training.

``TeacherStream`` is the dataset, ``collate`` turns records into padded batches, ``losses``
holds the sparse top-k distillation losses, and ``guards`` refuses students the cache cannot
teach (another tokenizer or vocabulary).
"""

from logitcache.trainer import losses
from logitcache.trainer.stream import TeacherStream

__all__ = ["TeacherStream", "losses"]
