"""Shared rendering for the commands: the stderr console and one-line figures."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.console import Console

from localmix.units import human_bytes

if TYPE_CHECKING:
    from localmix.events import Summary

err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_stats(summary: Summary, console: Console = err) -> None:
    """Timings and runtime counters of one reply, dimmed, on stderr."""
    console.print(
        f"[dim]prompt {summary.prompt_tokens} tokens ({summary.prefilled_tokens} new) · "
        f"prefill {summary.prefill_tokens_per_s:.1f} tok/s · first token "
        f"{summary.time_to_first_token_s * 1000:.0f} ms · {summary.generated_tokens} tokens at "
        f"{summary.decode_tokens_per_s:.1f} tok/s · stop: {summary.stop_reason} · context "
        f"{summary.context_used}/{summary.context_size}[/dim]"
    )
    if summary.stats is not None:
        s = summary.stats.summary
        console.print(
            f"[dim]experts: hit rate {s.hit_rate:.1%} · {s.loads_per_token:.2f} loads/token · "
            f"{human_bytes(s.bytes_per_token)}/token moved · prefetch precision "
            f"{s.prefetch_precision:.1%}, recall {s.prefetch_recall:.1%}[/dim]"
        )
        per_layer = " ".join(
            f"{i}:{ls.hits}/{ls.hits + ls.misses}" for i, ls in enumerate(summary.stats.per_layer)
        )
        console.print(f"[dim]hits per layer: {per_layer}[/dim]")


def prefill_progress(console: Console = err) -> Callable[[int, int], None]:
    """A `progress` callback for the engine: a line at each tenth of a long prompt's prefill."""
    shown = -1

    def report(done: int, total: int) -> None:
        nonlocal shown
        tenth = done * 10 // total
        if tenth > shown:
            shown = tenth
            console.print(f"[dim]prefill {done}/{total} tokens[/dim]")

    return report


def os_error_line(e: OSError) -> str:
    """An OSError (a full disk, a closed pipe) in one line: what failed, and on which file."""
    what = e.strerror or str(e)
    return f"{e.filename}: {what}" if e.filename else what
