"""Held-out perplexity of an engine, and its divergence from a reference, for tests and benchmarks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .engine import Engine


def token_losses(engine: Engine, token_ids: Sequence[int], chunk: int = 256) -> torch.Tensor:
    """Next-token loss (nats, float64) of every token after the first, over consecutive chunks of
    `chunk` tokens, each a fresh pass."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    losses = []
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start : start + chunk + 1]
        if len(piece) < 2:
            break
        logits = engine.logits(piece[:-1]).float()
        losses.append(torch.nn.functional.cross_entropy(logits, piece[1:], reduction="none"))
    return torch.cat(losses).double() if losses else torch.zeros(0, dtype=torch.float64)


def perplexity(engine: Engine, token_ids: Sequence[int], chunk: int = 256) -> float:
    """exp(mean next-token loss) over consecutive chunks of `chunk` tokens, each a fresh pass."""
    losses = token_losses(engine, token_ids, chunk)
    return math.exp(float(losses.mean())) if len(losses) else 1.0


def paired_difference(a: torch.Tensor, b: torch.Tensor, block: int = 256) -> tuple[float, float]:
    """Mean of a - b for two models' `token_losses` on the same text, and its standard error.

    Neighbouring tokens' differences are correlated, so the error is taken over blocks of
    `block` tokens (the evaluation chunks), not single tokens. A perplexity difference smaller
    than about two standard errors says nothing about which model is better.
    """
    if a.shape != b.shape:
        raise ValueError(f"losses of different texts: {tuple(a.shape)} vs {tuple(b.shape)}")
    d = a - b
    n = len(d) // block
    if n < 2:
        raise ValueError(f"need at least {2 * block} tokens, got {len(d)}")
    means = d[: n * block].reshape(n, block).mean(1)
    return float(d.mean()), float(means.std() / math.sqrt(n))


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
