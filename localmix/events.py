"""The events a generation yields, importable without PyTorch (a client builds them from a
server's answer): a TokenEvent per token, then one Summary."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .expert_cache import OffloadStats
    from .sampling import SamplingOptions


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it completes ("" while a character or stop is pending)."""

    token_id: int
    text: str


@dataclass(frozen=True)
class Summary:
    """The last event of a generation."""

    prompt_tokens: int  # the whole prompt
    prefilled_tokens: int  # the part that was not already in the KV cache
    generated_tokens: int
    text: str
    token_ids: list[int]
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    stop_reason: str  # "eos", "length" (max_tokens), "stop" (a stop string)
    context_used: int  # KV cache positions in use afterwards
    context_size: int
    stats: OffloadStats | None = None  # the expert cache's, when experts are offloaded

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of `run --json` and of the server's closing chunk (stats: {} when
        no expert is offloaded)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["stats"] = self.stats.to_dict() if self.stats is not None else {}
        return out

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Summary:
        """The Summary `to_dict` wrote; a missing or unknown field raises TypeError or
        KeyError."""
        from .expert_cache import OffloadStats  # only a summary with offloaded experts has them

        stats = fields.get("stats")
        return cls(**{**fields, "stats": OffloadStats.from_dict(stats) if stats else None})


Event = TokenEvent | Summary


class ChatEngine(Protocol):
    """What a chat asks of an engine: a model loaded here (`engine.Engine`) or one that
    `localmix serve` holds (`cli.client.RemoteEngine`)."""

    name: str
    context: int

    @property
    def defaults(self) -> SamplingOptions: ...

    def reset(self) -> None: ...

    def kernels(self) -> str: ...

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        progress: Callable[[int, int], None] | None = None,
        **sampling: Any,
    ) -> Generator[Event, None, None]: ...
