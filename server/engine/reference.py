"""An independent teacher computation with a plain transformers forward pass.

This is the reference that tests hold vLLM's output against. It is never used as a fallback
engine: it is slow and has none of vLLM's batching.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from logitcache.client.codecs import TopKRows


class TransformersReference:
    """fp32 forward pass, log_softmax over the full vocabulary, top-k per position."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    @torch.no_grad()
    def full_logprobs(self, input_ids: np.ndarray) -> torch.Tensor:
        """float32 [T, V] log-probabilities of the next token at every position."""
        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))[None]
        logits = self.model(input_ids=ids).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def capture(self, input_ids: np.ndarray, k: int) -> TopKRows:
        logprobs = self.full_logprobs(input_ids)
        top = torch.topk(logprobs, k, dim=-1)
        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
        target = torch.full((len(ids),), float("nan"))
        target[:-1] = logprobs[:-1].gather(1, ids[1:, None])[:, 0]
        return TopKRows(
            token_ids=top.indices.to(torch.int32).numpy(),
            logprobs=top.values.numpy(),
            target_logprobs=target.numpy(),
        )
