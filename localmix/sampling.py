"""Token sampling: small pure functions over a logits vector, combined by `make_sampler`.

`SamplingOptions`, the gate for every sampling setting, is used where no model runs (a client
of `localmix serve`): PyTorch is imported by the functions that compute, not by the module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from .errors import OptionError

if TYPE_CHECKING:
    import torch

Sampler = Callable[["torch.Tensor", Sequence[int]], int]


SEED_LIMIT = 2**64  # torch.Generator takes seeds in [0, 2**64)
REALS = ("temperature", "top_p", "min_p", "repetition_penalty")
INTEGERS = ("top_k", "max_tokens", "seed")
# The options a chat sets one at a time, as text (all but the stop strings).
SETTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_tokens")


@dataclass(frozen=True)
class SamplingOptions:
    """Every knob of generation, with the defaults every entry point shares.

    The one gate for sampling settings, wherever they come from (options, `/set`, a saved
    conversation, the TUI's fields): a wrong type or a value out of range is an `OptionError`.
    """

    temperature: float = 0.7
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None
    max_tokens: int = 512
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in REALS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise OptionError(f"{name} must be a number, not {value!r}")
            if not math.isfinite(value):
                raise OptionError(f"{name} must be a finite number, not {value}")
        for name in INTEGERS:
            value = getattr(self, name)
            if (value is not None or name != "seed") and (
                isinstance(value, bool) or not isinstance(value, int)
            ):
                raise OptionError(f"{name} must be a whole number, not {value!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise OptionError(f"stop must be a list of strings, not {self.stop!r}")
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_tokens >= 0, "max_tokens must be >= 0"),
            (self.seed is None or 0 <= self.seed < SEED_LIMIT, "seed must be in [0, 2**64)"),
        ]
        for ok, message in checks:
            if not ok:
                raise OptionError(message)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def parse(cls, name: str, text: str) -> float | int:
        """A setting typed as text (`/set seed 7`, a field of the TUI), converted and checked."""
        if name not in SETTABLE:
            raise OptionError(f"unknown sampling option '{name}'; use {', '.join(SETTABLE)}")
        try:
            value = float(text) if name in REALS else int(text)
        except ValueError:
            kind = "a number" if name in REALS else "a whole number"
            raise OptionError(f"{name} must be {kind}, not '{text}'") from None
        SamplingOptions().updated(**{name: value})
        return value

    def updated(self, /, **changes: object) -> SamplingOptions:
        """A copy with some options changed; unknown names are an error."""
        unknown = set(changes) - set(self.names())
        if unknown:
            raise OptionError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        stop = changes.get("stop")
        if isinstance(stop, str):
            changes["stop"] = (stop,)
        elif isinstance(stop, list):  # from JSON
            changes["stop"] = tuple(stop)
        given: dict[str, Any] = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **given)  # each value is checked in __post_init__


def apply_repetition_penalty(
    logits: torch.Tensor, history: Sequence[int], penalty: float
) -> torch.Tensor:
    """CTRL-style penalty: shrink the logits of tokens already seen (positive ones divided)."""
    import torch

    if penalty == 1.0 or not history:
        return logits
    ids = torch.tensor(sorted(set(history)), device=logits.device)
    seen = logits[ids]
    logits = logits.clone()
    penalised = torch.where(seen > 0, seen / penalty, seen * penalty)
    big = torch.finfo(logits.dtype).max  # an extreme penalty must not make infinities
    logits[ids] = penalised.clamp(-big, big)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    import torch

    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    import torch

    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= p  # mass before this token
    return logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one."""
    import torch

    if min_p <= 0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def make_sampler(opts: SamplingOptions) -> Sampler:
    """A callable (logits (vocab,), history) -> token id; greedy when temperature is 0."""
    import torch

    gen = torch.Generator()
    gen.manual_seed(opts.seed if opts.seed is not None else torch.seed())

    def sample(logits: torch.Tensor, history: Sequence[int]) -> int:
        # float64: extreme temperatures and penalties (1e-300) stay finite
        logits = apply_repetition_penalty(logits.double(), history, opts.repetition_penalty)
        if opts.temperature == 0:
            return int(torch.argmax(logits))
        logits = (logits - logits.max()) / opts.temperature  # at most 0: never overflows
        logits = top_k_filter(logits, opts.top_k)
        logits = top_p_filter(logits, opts.top_p)
        logits = min_p_filter(logits, opts.min_p)
        probs = torch.softmax(logits, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=gen))

    return sample


class StopMatcher:
    """Holds back text that might begin a stop string; reports when one is complete."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is safe to release now."""
        if not self.stops:
            return text
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
