"""A rolling-buffer KV cache: memory bounded by a window of W positions, whatever the chat length."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import hugepages


def slot_of(pos: torch.Tensor, sinks: int, capacity: int) -> torch.Tensor:
    """Buffer slot holding absolute position `pos`: sinks stay put, the rest wrap around."""
    ring = capacity - sinks
    return torch.where(pos < sinks, pos, sinks + (pos - sinks) % ring)


def slot_of_int(pos: int, sinks: int, capacity: int) -> int:
    """`slot_of` for one position as a Python int (a decode step's bookkeeping, no tensor op)."""
    return pos if pos < sinks else sinks + (pos - sinks) % (capacity - sinks)


def attention_allowed(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, sinks: int
) -> torch.Tensor:
    """Boolean (queries, keys): causal, within the last `window - sinks` positions or a sink.

    Empty slots carry position -1 and are never attended.
    """
    q = q_pos[:, None]
    k = k_pos[None, :]
    recent = (q - k) < (window - sinks)
    return (k >= 0) & (k <= q) & (recent | (k < sinks))


@dataclass
class CacheStep:
    """One forward call of `n` new tokens through the cache: the bookkeeping every layer
    shares, and each layer's `update_and_fetch`. Made by `RollingKVCache.step`, which records
    the new positions once the call has gone through every layer."""

    cache: RollingKVCache
    n: int  # new tokens
    first_slot: int  # where the first new token is written, as a Python int
    used: int  # slots in use after the write (a prefix of the buffer)
    mask: torch.Tensor | None = None  # (n, keys) bool; None: every key visible to the one query
    concat: bool = False  # attend over buffer + new keys, then write (a chunk that wraps)
    # (n,) absolute positions of the new tokens and their slots; None for one token that sees
    # every key, whose bookkeeping is done in Python integers
    positions: torch.Tensor | None = None
    slots: torch.Tensor | None = None

    def single(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
        """For a step of one token that sees every cached key (the usual decode step): this
        layer's key and value buffers (kv_heads, capacity, head_dim), the slot the token's key
        and value go to, and how many slots it attends (0..used-1, its own included). None for
        any other step, which goes through `update_and_fetch`."""
        if self.slots is not None:
            return None
        return self.cache.k[layer], self.cache.v[layer], self.first_slot, self.used

    def update_and_fetch(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store this layer's new keys/values (n, kv_heads, head_dim); return what to attend.

        Returns keys and values as (kv_heads, keys, head_dim) and the step's mask.
        """
        keys_of, values_of = self.cache.k[layer], self.cache.v[layer]
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # (kv_heads, n, head_dim)
        if self.concat:
            keys = torch.cat([keys_of, k], dim=1)
            values = torch.cat([values_of, v], dim=1)
            assert self.slots is not None  # a chunk that wraps has several tokens
            keys_of[:, self.slots] = k
            values_of[:, self.slots] = v
            return keys, values, self.mask
        if k.shape[1] == 1:
            slot = self.first_slot
            keys_of[:, slot : slot + 1] = k
            values_of[:, slot : slot + 1] = v
        else:
            assert self.slots is not None  # several tokens
            keys_of[:, self.slots] = k
            values_of[:, self.slots] = v
        return keys_of[:, : self.used], values_of[:, : self.used], self.mask


class RollingKVCache:
    """Keys and values of the last `window` positions of each layer, in a ring of slots.

    Positions are absolute (RoPE is applied before a key is cached), so a slot's content never
    changes once written. With `sinks=S`, positions 0..S-1 keep slots 0..S-1 for good and the
    other `capacity - S` slots roll. Worked example, capacity 4, sinks 1, ten tokens seen:

        slot:      0  1  2  3
        position:  0  7  8  9     (position p >= 1 lives in slot 1 + (p - 1) % 3)

    Position 10 then goes to slot 1 + 9 % 3 = 1, replacing 7: the query at 10 sees 0, 8, 9, 10.
    Without sinks this is Mistral's sliding window: a query sees itself and the W - 1 before it.

    A single new token is written first and then attends over the buffer (the slot it replaces
    is one the new query may no longer see). A chunk of several tokens that wraps around would
    overwrite keys its own earlier queries still need, so it attends over the old buffer and the
    new keys together and is written afterwards. Chunks are at most `capacity - sinks` long.

    `capacity` defaults to `window`; a larger capacity (for a fresh full forward) keeps every
    position and applies the window through the mask alone.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        window: int,
        *,
        sinks: int = 0,
        capacity: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        capacity = capacity or window
        if not 0 <= sinks < min(window, capacity):
            raise ValueError(f"sinks ({sinks}) must be below the window ({window})")
        self.window, self.sinks, self.capacity = window, sinks, capacity
        shape = (n_layers, n_kv_heads, capacity, head_dim)
        if torch.device(device).type == "cpu":  # read end to end every decode step
            self.k, self.v = hugepages.zeros(shape, dtype), hugepages.zeros(shape, dtype)
        else:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_pos = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.next_pos = 0  # tokens seen so far = absolute position of the next token

    @property
    def max_chunk(self) -> int:
        """Longest chunk one forward call may always bring (longer ones fit while not wrapping)."""
        return self.capacity - self.sinks

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def used(self) -> int:
        """Slots holding a position (the fill of the window)."""
        return min(self.next_pos, self.capacity)

    def reset(self) -> None:
        self.slot_pos.fill_(-1)
        self.next_pos = 0

    def rewind(self, n_tokens: int) -> bool:
        """Forget positions >= n_tokens; False if the buffer has already dropped some of them."""
        if n_tokens >= self.next_pos:
            return n_tokens == self.next_pos
        if self.next_pos > self.capacity:  # wrapped: older positions are gone
            return False
        self.slot_pos[n_tokens:] = -1
        self.next_pos = n_tokens
        return True

    @contextmanager
    def step(self, n: int) -> Iterator[CacheStep]:
        """A forward call of `n` new tokens: every layer calls the step's `update_and_fetch`,
        and the positions count as cached when the block ends without an error (a call cut
        short leaves some layers written: the caller resets the cache)."""
        step = self._begin(n)
        yield step
        self._record(step)

    def _begin(self, n: int) -> CacheStep:
        """The bookkeeping of a forward call of `n` new tokens."""
        limit = max(self.max_chunk, self.capacity - self.next_pos)
        if not 0 < n <= limit:
            raise ValueError(f"chunk of {n} tokens; the cache takes 1..{limit} now")
        if n == 1 and (self.next_pos < self.window or self.capacity <= self.window):
            # One token that sees every key: either no key has left the window yet, or the
            # buffer holds no more than the window (see the class docstring).
            pos = self.next_pos
            slot = slot_of_int(pos, self.sinks, self.capacity)
            return CacheStep(self, 1, slot, min(pos + 1, self.capacity))
        dev = self.slot_pos.device
        positions = torch.arange(self.next_pos, self.next_pos + n, device=dev)
        slots = slot_of(positions, self.sinks, self.capacity)
        wraps = self.next_pos + n > self.capacity
        concat = wraps and n > 1
        if concat:
            key_positions = torch.cat([self.slot_pos, positions])
            used = self.capacity
        else:
            used = min(self.next_pos + n, self.capacity)
            key_positions = self.slot_pos[:used].clone()
            key_positions[slots] = positions
        allowed = attention_allowed(positions, key_positions, self.window, self.sinks)
        mask = None if n == 1 and bool(allowed.all()) else allowed  # None: every key visible
        first = int(slots[0])  # once per step, not once per layer
        return CacheStep(self, n, first, used, mask, concat, positions, slots)

    def _record(self, step: CacheStep) -> None:
        """The step's positions are in every layer now: they hold their slots."""
        if step.slots is None or step.positions is None:  # one token, in Python integers
            self.slot_pos[step.first_slot] = self.next_pos
        else:
            self.slot_pos[step.slots] = step.positions
        self.next_pos += step.n
