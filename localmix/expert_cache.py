"""The expert cache's bookkeeping: per-layer slots, eviction policies, prefetch, statistics.

Data movement is delegated to a `Mover` (host -> device copies of packed experts); with no
mover the same code replays routing traces, counting what would move. The runtime and
`localmix bench-cache` use this one class.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable


class Mover(Protocol):
    """Copies expert `expert` of `layer` into device slot `slot` (asynchronously if it can)."""

    def load(self, layer: int, expert: int, slot: int) -> None: ...

    def ready(self, layer: int, slot: int) -> None:
        """Block until the slot's last load has landed (the compute stream waits on it)."""
        ...


class Policy(Protocol):
    """Chooses which resident expert of a layer to evict."""

    def touch(self, layer: int, experts: list[int]) -> None:
        """A token's request for these experts at `layer` (called once per request)."""
        ...

    def victim(self, layer: int, candidates: list[int]) -> int:
        """One of `candidates` (resident, not needed now) to evict."""
        ...


@runtime_checkable
class ReusePolicy(Policy, Protocol):
    """A policy that also estimates how likely an expert is to be used again soon."""

    def reuse(self, layer: int, expert: int, current: list[int]) -> float:
        """The chance (0..1) that the request after one for `current` at `layer` asks for
        `expert`."""
        ...


class LRU:
    """Evict the expert used least recently."""

    name = "lru"

    def __init__(self) -> None:
        self.clock: dict[int, int] = defaultdict(int)
        self.last: dict[tuple[int, int], int] = {}

    def touch(self, layer: int, experts: list[int]) -> None:
        self.clock[layer] += 1
        for e in experts:
            self.last[layer, e] = self.clock[layer]

    def victim(self, layer: int, candidates: list[int]) -> int:
        return min(candidates, key=lambda e: (self.last.get((layer, e), -1), e))


class Transition:
    """Evict the expert least likely to be needed by the next token at this layer.

    Per layer, an online count of how often expert b follows expert a at the next token,
    smoothed toward each expert's recency-weighted frequency. Routing has memory (adjacent
    tokens share many of their experts in Mixtral), and which experts follow which is stable
    within a text; LRU keeps only the first half of that. Scores depend on counts, so the policy
    adapts to any model without tuning.
    """

    name = "transition"

    def __init__(self, prior: float = 2.0, decay: float = 0.97) -> None:
        self.prior, self.decay = prior, decay
        self.trans: dict[int, dict[int, dict[int, float]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(float))
        )
        self.freq: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.mass: dict[int, float] = defaultdict(float)
        self.current: dict[int, list[int]] = {}

    def touch(self, layer: int, experts: list[int]) -> None:
        prev = self.current.get(layer)
        if prev is not None:
            for a in prev:
                row = self.trans[layer][a]
                for b in experts:
                    row[b] += 1.0
        freq = self.freq[layer]
        for e in list(freq):
            freq[e] *= self.decay
        for e in experts:
            freq[e] += 1.0
        self.mass[layer] = self.mass[layer] * self.decay + 1.0
        self.current[layer] = list(experts)

    def next_use(self, layer: int, e: int, current: list[int] | None = None) -> float:
        """How likely the next token at `layer` uses expert e, up to a constant, after a token
        that used `current` (default: the last request's experts)."""
        base = self.freq[layer][e] / max(self.mass[layer], 1.0)
        score = 0.0
        for a in self.current.get(layer, []) if current is None else current:
            row = self.trans[layer][a]
            score += (row[e] + self.prior * base) / (sum(row.values()) + self.prior)
        return score

    def reuse(self, layer: int, expert: int, current: list[int]) -> float:
        """`next_use` read as a probability: each current expert's row, normalised, gives the
        share of the next token's top_k picks that went to `expert`, so the sum over the top_k
        current experts estimates the chance it is among them."""
        return min(self.next_use(layer, expert, current), 1.0)

    def victim(self, layer: int, candidates: list[int]) -> int:
        return min(candidates, key=lambda e: (self.next_use(layer, e), e))


POLICIES = {"lru": LRU, "transition": Transition}
DEFAULT_POLICY = "transition"


def make_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy '{name}'; use one of {', '.join(POLICIES)}")
    return POLICIES[name]()


@dataclass
class LayerStats:
    """One layer's running counters."""

    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0  # hits on experts that a prefetch brought in
    elsewhere: int = 0  # misses computed off the device (on the CPU, from the host store)
    loads: int = 0  # demand loads
    prefetch_loads: int = 0
    predicted: int = 0  # experts a prefetch predicted
    predicted_right: int = 0  # of those, used by the layer's next request
    requested_predicted: int = 0  # experts requested at a layer that had a prediction

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.requests, 1)


@dataclass(frozen=True)
class CacheSummary:
    """An expert cache's counters over all layers, read per token where that is what matters."""

    hit_rate: float
    computed_on_host: int  # misses computed on the CPU instead of copied
    prefetch_hits: int
    loads_per_token: float  # demand and prefetch loads
    bytes_per_token: float  # moved over the link
    bytes_moved: int
    prefetch_precision: float  # of the experts a prefetch predicted, the share then used
    prefetch_recall: float  # of the experts used where a prediction was made, the share predicted
    tokens: int


@dataclass(frozen=True)
class LayerSummary:
    """One layer's slots and what its requests found."""

    slots: int
    hits: int
    misses: int
    prefetch_hits: int
    loads: int  # demand and prefetch loads


@dataclass(frozen=True)
class OffloadStats:
    """What serving offloaded experts has cost so far: the totals and each layer's share.

    `to_dict` is the JSON shape of `run --json`'s stats and of the server's `/health` (the
    totals' fields, then `per_layer`); `from_dict` reads it back (a client of the server).
    """

    summary: CacheSummary
    per_layer: tuple[LayerSummary, ...]

    def to_dict(self) -> dict[str, Any]:
        """The totals' fields, then `per_layer`: a list of each layer's."""
        return {**asdict(self.summary), "per_layer": [asdict(ls) for ls in self.per_layer]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OffloadStats:
        """The stats `to_dict` wrote; a missing or unknown field raises TypeError or KeyError."""
        totals = {k: v for k, v in data.items() if k != "per_layer"}
        per_layer = tuple(LayerSummary(**ls) for ls in data["per_layer"])
        return cls(CacheSummary(**totals), per_layer)


@dataclass
class CacheStats:
    """Counters of an expert cache, per layer and in total."""

    expert_bytes: int
    layers: list[LayerStats] = field(default_factory=list)
    tokens: int = 0

    def total(self) -> LayerStats:
        """Every layer's counters summed."""
        out = LayerStats()
        for s in self.layers:
            for k in vars(out):
                setattr(out, k, getattr(out, k) + getattr(s, k))
        return out

    def summary(self) -> CacheSummary:
        """The totals over all layers, per token where that is what matters."""
        t = self.total()
        loads = t.loads + t.prefetch_loads
        tokens = max(self.tokens, 1)
        return CacheSummary(
            hit_rate=t.hit_rate,
            computed_on_host=t.elsewhere,
            prefetch_hits=t.prefetch_hits,
            loads_per_token=loads / tokens,
            bytes_per_token=loads * self.expert_bytes / tokens,
            bytes_moved=loads * self.expert_bytes,
            prefetch_precision=t.predicted_right / t.predicted if t.predicted else 0.0,
            prefetch_recall=(
                t.predicted_right / t.requested_predicted if t.requested_predicted else 0.0
            ),
            tokens=self.tokens,
        )


class ExpertCache:
    """Which expert sits in which device slot, per layer; what to load, what to evict.

    `request(layer, experts)` serves a layer's experts for one forward call: resident ones
    first, then each missing one after loading it into a slot whose expert is not among those
    still to be served (so a token's experts never evict each other, and a prefill chunk that
    needs more experts than there are slots streams each one once). `prefetch(layer, experts)`
    loads predicted experts ahead of their layer. `slots` gives each layer's number of slots.
    """

    def __init__(
        self,
        slots: list[int],
        policy: Policy,
        mover: Mover | None = None,
        expert_bytes: int = 0,
    ) -> None:
        self.slots = [[-1] * n for n in slots]  # the expert in each slot, -1 if free
        self.where: list[dict[int, int]] = [{} for _ in slots]
        self.prefetched: list[set[int]] = [set() for _ in slots]
        self.predicted: list[set[int]] = [set() for _ in slots]
        self.predicted_any = [False] * len(slots)
        self.policy, self.mover = policy, mover
        # the policy again where it estimates reuse (checked once: isinstance on a protocol is slow)
        self.reuse_policy = policy if isinstance(policy, ReusePolicy) else None
        self.stats = CacheStats(expert_bytes, [LayerStats() for _ in slots])

    def report(self) -> OffloadStats:
        """The statistics so far: the totals and, per layer, its slots and counters."""
        per_layer = tuple(
            LayerSummary(len(held), s.hits, s.misses, s.prefetch_hits, s.loads + s.prefetch_loads)
            for held, s in zip(self.slots, self.stats.layers, strict=True)
        )
        return OffloadStats(self.stats.summary(), per_layer)

    def resident(self, layer: int) -> list[int]:
        """The experts of `layer` that hold a device slot, ascending."""
        return sorted(self.where[layer])

    def copy_value(self, layer: int, expert: int, needed: list[int]) -> float:
        """How much likelier the request after this one (for `needed`) at `layer` is to use
        `expert` than the expert that loading it would evict (0 with a free slot to fill, or
        where the policy makes no estimate): the future miss a copy may save, as a
        probability."""
        policy = self.reuse_policy
        if policy is None or not self.slots[layer]:
            return 0.0
        gain = policy.reuse(layer, expert, needed)
        if -1 not in self.slots[layer]:
            candidates = [e for e in self.where[layer] if e not in needed]
            if not candidates:
                return 0.0
            gain -= policy.reuse(layer, policy.victim(layer, candidates), needed)
        return max(gain, 0.0)

    def _place(self, layer: int, expert: int, protected: set[int]) -> int:
        """A slot for `expert` (free, or freed by the policy); starts its load."""
        slots = self.slots[layer]
        if -1 in slots:
            slot = slots.index(-1)
        else:
            candidates = [e for e in self.where[layer] if e not in protected]
            if not candidates:
                raise RuntimeError(f"layer {layer}: every slot holds an expert still needed")
            old = self.policy.victim(layer, candidates)
            slot = self.where[layer].pop(old)
            self.prefetched[layer].discard(old)
        slots[slot] = expert
        self.where[layer][expert] = slot
        if self.mover is not None:
            self.mover.load(layer, expert, slot)
        return slot

    def request(
        self,
        layer: int,
        experts: list[int],
        tokens: int = 1,
        elsewhere: Collection[int] = (),
    ) -> Iterator[tuple[int, int]]:
        """Yield (expert, slot) for each expert a forward call of `tokens` tokens needs, except
        those in `elsewhere`: missing experts computed off the device, which count as misses
        and are neither loaded nor served.

        The loads of missing experts that fit beside the resident ones start here, when it is
        called, before anything else is queued (a prefetch issued after this call lands behind
        them); iterating serves resident experts first, then the loaded ones, then streams the
        rest through slots whose expert is not among those still to be served.
        """
        stats = self.stats.layers[layer]
        if layer == 0:
            self.stats.tokens += tokens
        if self.predicted[layer]:
            stats.predicted_right += len(self.predicted[layer] & set(experts))
            self.predicted[layer] = set()
            self.predicted_any[layer] = True
        self.policy.touch(layer, experts)
        where = self.where[layer]
        hits = [e for e in experts if e in where]
        missing = [e for e in experts if e not in where and e not in elsewhere]
        stats.requested_predicted += len(experts) if self.predicted_any[layer] else 0
        self.predicted_any[layer] = False
        stats.hits += len(hits)
        stats.misses += len(experts) - len(hits)
        stats.elsewhere += len(experts) - len(hits) - len(missing)
        stats.prefetch_hits += sum(e in self.prefetched[layer] for e in hits)
        self.prefetched[layer] -= set(hits)
        # Start every load that fits beside this request's experts now, so they land while
        # the resident ones compute; a chunk needing more experts than slots streams the rest.
        room = len(self.slots[layer]) - len(hits)
        started = [(e, self._place(layer, e, set(experts))) for e in missing[:room]]
        stats.loads += len(started)
        ready = [(e, where[e]) for e in hits] + started
        return self._serve(layer, hits + missing, ready, missing[room:])

    def _serve(
        self, layer: int, experts: list[int], ready: list[tuple[int, int]], rest: list[int]
    ) -> Iterator[tuple[int, int]]:
        pending = set(experts)
        for e, slot in ready:
            if self.mover is not None:
                self.mover.ready(layer, slot)
            pending.discard(e)
            yield e, slot
        for e in rest:
            slot = self._place(layer, e, pending)
            self.stats.layers[layer].loads += 1
            if self.mover is not None:
                self.mover.ready(layer, slot)
            pending.discard(e)
            yield e, slot

    def load_behind(self, layer: int, experts: list[int], needed: list[int]) -> int:
        """Start loading `experts` of `layer`, computed elsewhere for this request, so that
        they are resident next time (never evicting one of `needed`); how many it started."""
        room = len(self.slots[layer]) - sum(e in self.where[layer] for e in needed)
        started = 0
        for e in experts:
            if started >= room or e in self.where[layer]:
                continue
            self._place(layer, e, set(needed))
            started += 1
        self.stats.layers[layer].loads += started
        return started

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start loading predicted experts of `layer` that are not resident."""
        stats = self.stats.layers[layer]
        self.predicted[layer] = set(experts)
        stats.predicted += len(experts)
        room = len(self.slots[layer])
        for e in experts[:room]:
            if e in self.where[layer]:
                continue
            self._place(layer, e, set(experts))
            self.prefetched[layer].add(e)
            stats.prefetch_loads += 1
