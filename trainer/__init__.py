"""logitcache.trainer: stream cached teacher distributions into PyTorch student training.

``TeacherStream`` is the dataset, ``collate`` turns records into padded batches (and
``TeacherTargets``, what the losses read), ``losses`` holds the sparse distillation losses (one
chunked engine: on logits, or fused from hidden states so that [B, T, V] logits never exist) and
``sampled_kl``, the unbiased forward-KL estimate from sampled rows, ``output_layer`` runs a fused
loss inside a student's output layer, and ``guards`` refuses students the cache cannot teach
(another tokenizer or vocabulary).
"""

from logitcache.trainer import losses
from logitcache.trainer.losses import sampled_kl
from logitcache.trainer.stream import TeacherStream

__all__ = ["TeacherStream", "losses", "sampled_kl"]
