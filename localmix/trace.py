"""Replaying routing traces through the expert cache (`localmix bench-cache`).

A trace line is `{"problem_id", "layer", "token_idx", "experts": [...]}` (the format of
shared/traces). Each prompt is replayed from an empty cache: tokens in order, layers in order,
each layer asking for its token's experts together, through the same `ExpertCache` the
runtime uses. A missing (token, layer) pair is no access.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import LocalmixError
from .expert_cache import ExpertCache, make_policy

# Mixtral-8x7B: each expert is three 4096 x 14336 matrices.
MIXTRAL_EXPERT_PARAMS = 3 * 4096 * 14336
PREDICTORS = ("cross-layer",)  # predicts layer L+1 from layer L (CrossLayerPredictor)

Trace = dict[int, list[dict[int, list[int]]]]  # prompt -> per token: {layer: experts}


def read_trace(path: str | Path) -> tuple[Trace, int, int]:
    """Parse a trace: per prompt, per token, the experts of each layer; and its shape."""
    tokens: dict[int, dict[int, dict[int, list[int]]]] = defaultdict(lambda: defaultdict(dict))
    n_layers = n_experts = 0
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                r = json.loads(line)
                experts = [int(e) for e in r["experts"]]
                tokens[int(r["problem_id"])][int(r["token_idx"])][int(r["layer"])] = experts
                n_layers = max(n_layers, int(r["layer"]) + 1)
                n_experts = max(n_experts, max(experts) + 1)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LocalmixError(f"{path}: not a routing trace ({e})") from e
    if not tokens:
        raise LocalmixError(f"{path}: empty trace")
    trace = {p: [t[i] for i in sorted(t)] for p, t in sorted(tokens.items())}
    return trace, n_layers, n_experts


class Belady:
    """The offline optimum: evict the expert whose next use is farthest (knows the future)."""

    name = "belady"

    def __init__(self, tokens: list[dict[int, list[int]]]) -> None:
        self.tokens = tokens
        self.now: dict[int, int] = defaultdict(lambda: -1)

    def touch(self, layer: int, experts: list[int]) -> None:
        t = self.now[layer] + 1
        while layer not in self.tokens[t]:
            t += 1
        self.now[layer] = t

    def victim(self, layer: int, candidates: list[int]) -> int:
        def next_use(e: int) -> int:
            for u in range(self.now[layer] + 1, len(self.tokens)):
                if e in self.tokens[u].get(layer, ()):
                    return u
            return len(self.tokens) + e

        return max(candidates, key=next_use)


class CrossLayerPredictor:
    """Predicts layer L+1's experts from layer L's, with counts learned online (same token)."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.counts: dict[tuple[int, int], dict[int, float]] = defaultdict(
            lambda: defaultdict(float)
        )

    def predict(self, layer: int, experts: list[int]) -> list[int]:
        scores: dict[int, float] = defaultdict(float)
        for a in experts:
            for b, c in self.counts[layer, a].items():
                scores[b] += c
        ranked = sorted(scores, key=lambda b: (-scores[b], b))
        return ranked[: self.top_k]

    def learn(self, layer: int, experts: list[int], following: list[int]) -> None:
        for a in experts:
            for b in following:
                self.counts[layer, a][b] += 1.0


@dataclass(frozen=True)
class ReplayResult:
    """What one policy (and predictor) did over a trace."""

    hit_rate: float
    loads_per_token: float  # demand loads and prefetches
    bytes_per_token: float
    prefetch_precision: float | None  # None: nothing was predicted
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of `bench-cache --json`."""
        return asdict(self)


def replay(
    trace: Trace,
    n_layers: int,
    slots: int | list[int],
    policy: str,
    predictor: str | None,
    expert_bytes: int,
) -> ReplayResult:
    """Hit rate, loads and bytes per token of one policy (and predictor) over the trace.

    `slots` is per layer: one number for all, or a list (as a placement plan gives).
    """
    per_layer = [slots] * n_layers if isinstance(slots, int) else list(slots)
    hits = requests = loads = tokens = predicted = right = 0
    for prompt_tokens in trace.values():
        pol = Belady(prompt_tokens) if policy == "belady" else make_policy(policy)
        cache = ExpertCache(per_layer, pol, None, expert_bytes)
        cross = CrossLayerPredictor(top_k=2) if predictor else None
        for token in prompt_tokens:
            tokens += 1
            for layer in range(n_layers):
                experts = token.get(layer)
                if experts is None:
                    continue
                for _ in cache.request(layer, experts):
                    pass
                nxt = token.get(layer + 1)
                if cross is not None and nxt is not None:
                    cache.prefetch(layer + 1, cross.predict(layer, experts))
                    cross.learn(layer, experts, nxt)
        t = cache.stats.total()
        hits, requests = hits + t.hits, requests + t.requests
        loads += t.loads + t.prefetch_loads
        predicted, right = predicted + t.predicted, right + t.predicted_right
    return ReplayResult(
        hit_rate=hits / max(requests, 1),
        loads_per_token=loads / max(tokens, 1),
        bytes_per_token=loads * expert_bytes / max(tokens, 1),
        prefetch_precision=right / predicted if predicted else None,
        tokens=tokens,
    )
