"""Held-out perplexity of an engine, and its divergence from a reference, for tests and benchmarks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .engine import Engine


def perplexity(engine: Engine, token_ids: Sequence[int], chunk: int = 256) -> float:
    """exp(mean next-token loss) over consecutive chunks of `chunk` tokens, each a fresh pass."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start : start + chunk + 1]
        if len(piece) < 2:
            break
        logits = engine.logits(piece[:-1])
        loss = torch.nn.functional.cross_entropy(logits, piece[1:], reduction="sum")
        total += float(loss)
        count += len(piece) - 1
    return math.exp(total / max(count, 1))


def kl_divergence(
    engine: Engine, reference: Engine, token_ids: Sequence[int], chunk: int = 256
) -> float:
    """Mean KL(reference || engine) of the next-token distributions, over the same chunks as
    `perplexity`. It measures how far a quantized model drifts from its source: unlike the
    difference of two perplexities, it cannot come out in the quantized model's favour by chance.
    """
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start : start + chunk]
        if len(piece) < 2:
            break
        ref = reference.logits(piece).float().log_softmax(-1)
        got = engine.logits(piece).float().log_softmax(-1)
        total += float((ref.exp() * (ref - got)).sum())
        count += len(piece)
    return total / max(count, 1)
