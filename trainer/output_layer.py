"""Scoring a student inside its own output layer, so that its [B, T, V] logits never exist.

The fused losses (:func:`~logitcache.trainer.losses.fused_distillation_loss`) take the student's
last hidden states and its output layer's weight. The loss is computed *inside* the output
layer's call, not after the model returns: under DDP the forward still goes through the wrapper
(which prepares the gradient reduction), and under FSDP the layer's weight is unsharded exactly
during the model's forward. While :func:`loss_in_output_layer` is active, the layer returns the
loss instead of logits, and a Hugging Face causal LM hands it back as ``outputs.logits``::

    head = output_layer(student)            # None: no plain linear output layer, use logits
    fused = lambda h, w, b: fused_distillation_loss(h, w, targets, lm_head_bias=b)
    with loss_in_output_layer(head, fused) as scored:
        loss = scored.loss_from(model(input_ids=ids, attention_mask=mask))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["HeadLoss", "ScoredOutputLayer", "loss_in_output_layer", "output_layer"]

# (hidden [..., H], weight [V, H], bias [V] or None) -> the loss
HeadLoss = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def output_layer(model: nn.Module) -> nn.Linear | None:
    """The student's output layer if it is a plain ``nn.Linear`` (standard HF causal LMs), else
    None. DDP/FSDP wrappers (``.module``) are looked through. Models that transform the layer's
    result (logit soft-capping, scaling) have no usable one: the loss would be transformed too."""
    inner = model.module if isinstance(getattr(model, "module", None), nn.Module) else model
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    config = getattr(inner, "config", None)
    transforms = any(
        getattr(config, name, None) not in (None, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
    )
    return head if isinstance(head, nn.Linear) and not transforms else None


class ScoredOutputLayer:
    """The output layer's forward while a loss is computed in it; keeps what it returned."""

    def __init__(self, head: nn.Linear, loss: HeadLoss) -> None:
        self.head, self.loss = head, loss
        self.result: Tensor | None = None

    def __call__(self, hidden: Tensor) -> Tensor:
        if self.result is not None:
            raise RuntimeError("the output layer was called twice in one forward pass")
        self.result = self.loss(hidden, self.head.weight, self.head.bias)
        return self.result

    def loss_from(self, outputs: Any) -> Tensor:
        """The loss, as the model returned it (``outputs.logits``); RuntimeError if the model
        changed it on the way out or never called its output layer.

        The returned tensor is used, not the layer's: a wrapper (DDP) may pass outputs through
        an autograd node of its own, which must stay in the graph.
        """
        returned = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        if (
            self.result is None
            or not isinstance(returned, Tensor)
            or returned.shape != self.result.shape
            or not torch.equal(returned.detach(), self.result.detach())
        ):
            raise RuntimeError(
                "the model did not return its output layer's result unchanged, so the fused "
                "loss cannot be used with it: use the logits path (fused=False)"
            )
        return returned


@contextmanager
def loss_in_output_layer(head: nn.Linear, loss: HeadLoss) -> Iterator[ScoredOutputLayer]:
    """While active, ``head(hidden)`` returns ``loss(hidden, head.weight, head.bias)``."""
    scored = ScoredOutputLayer(head, loss)
    head.forward = scored  # type: ignore[method-assign,assignment]
    try:
        yield scored
    finally:
        del head.forward  # back to the class's forward
