"""The rolling KV cache: incremental decode, full forward and chunked prefill agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import localmix
from localmix import hugepages
from localmix.kv_cache import RollingKVCache, attention_allowed
from tests.helpers import vm_flags


@pytest.fixture(scope="module")
def engine(tiny_mixtral):
    return localmix.load(tiny_mixtral[0], device="cpu", dtype="fp32")


def run(engine, ids, window, chunk, sinks=0, capacity=None):
    """Logits for every position, feeding `ids` in chunks through a cache of that shape."""
    cache = engine.new_cache(window, sinks=sinks, capacity=capacity)
    out = []
    with torch.inference_mode():
        for i in range(0, len(ids), chunk):
            out.append(engine.model(ids[i : i + chunk], cache))
    return torch.cat(out), cache


IDS = torch.randint(3, 2000, (50,), generator=torch.Generator().manual_seed(3))


def test_incremental_and_chunked_equal_full_forward(engine):
    full = engine.logits(IDS)
    for chunk in (1, 7, 16, 50):
        got, _ = run(engine, IDS, window=64, chunk=chunk)
        assert torch.allclose(got, full, atol=1e-5), chunk


@pytest.mark.parametrize("window,chunk", [(8, 1), (8, 3), (8, 8), (13, 5), (16, 16)])
def test_wrapped_buffer_equals_sliding_window_full_forward(engine, window, chunk):
    # Reference: one pass over everything, the window applied by the mask alone.
    full, _ = run(engine, IDS, window=window, chunk=len(IDS), capacity=len(IDS))
    got, cache = run(engine, IDS, window=window, chunk=chunk)
    assert cache.next_pos == len(IDS) > 3 * window  # the ring wrapped several times
    assert cache.k.shape[2] == window  # memory bounded by the window
    assert torch.allclose(got, full, atol=1e-5)
    # and the window really matters: without it the logits differ
    unbounded, _ = run(engine, IDS, window=len(IDS), chunk=len(IDS))
    assert not torch.allclose(unbounded[-1], full[-1], atol=1e-3)


@pytest.mark.parametrize("chunk", [1, 4])
def test_attention_sinks_keep_first_tokens(engine, chunk):
    window, sinks = 10, 3
    full, _ = run(engine, IDS, window=window, chunk=len(IDS), sinks=sinks, capacity=len(IDS))
    got, cache = run(engine, IDS, window=window, chunk=chunk, sinks=sinks)
    assert torch.allclose(got, full, atol=1e-5)
    assert cache.slot_pos[:sinks].tolist() == [0, 1, 2]
    plain, _ = run(engine, IDS, window=window, chunk=chunk)
    assert not torch.allclose(plain[-1], got[-1], atol=1e-3)


def test_mask_rule():
    q = torch.tensor([5, 6])
    k = torch.tensor([0, 1, 2, 3, 4, 5, 6, -1])
    m = attention_allowed(q, k, window=3, sinks=1)
    # sink 0 always; recent = within window - sinks = 2 positions (itself and the one before)
    assert m[0].tolist() == [True, False, False, False, True, True, False, False]
    assert m[1].tolist() == [True, False, False, False, False, True, True, False]


def test_chunk_longer_than_ring_is_refused():
    cache = RollingKVCache(1, 1, 4, window=4, sinks=1)
    with cache.step(4):  # fits without wrapping
        pass
    with pytest.raises(ValueError), cache.step(4):  # would wrap over keys its own queries need
        pass
    assert cache.next_pos == 4  # the refused step recorded nothing


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc")
def test_a_cpu_cache_lies_on_huge_pages_where_supported():
    """Every decode step reads the cache end to end: on the CPU it is zeroed memory advised
    for huge pages (`hugepages.zeros`) where the system gives them."""
    cache = RollingKVCache(2, 2, 8, window=64, dtype=torch.bfloat16)
    for t in (cache.k, cache.v):
        assert t.shape == (2, 2, 64, 8) and t.dtype == torch.bfloat16
        assert not t.any()
        assert ("hg" in vm_flags(t)) == hugepages.supported()
    assert cache.k.data_ptr() != cache.v.data_ptr()


def test_a_step_cut_short_records_no_position():
    cache = RollingKVCache(1, 1, 4, window=8)
    with pytest.raises(KeyboardInterrupt), cache.step(3):
        raise KeyboardInterrupt  # Ctrl+C in the middle of the layers
    assert cache.next_pos == 0 and bool((cache.slot_pos == -1).all())
    with cache.step(2) as step:
        assert step.positions.tolist() == [0, 1]
    assert cache.next_pos == 2 and cache.slot_pos[:2].tolist() == [0, 1]


def test_rewind(engine):
    _, cache = run(engine, IDS[:10], window=32, chunk=10)
    assert cache.rewind(6) and cache.next_pos == 6 and cache.used == 6
    _, wrapped = run(engine, IDS, window=8, chunk=1)
    assert not wrapped.rewind(45)


def test_next_chat_turn_prefills_only_new_tokens(engine):
    engine.reset()
    messages = [{"role": "user", "content": "hello there"}]
    first = engine.complete_chat(messages, temperature=0, max_tokens=6)
    assert first.prefilled_tokens == first.prompt_tokens
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "more"}]
    second = engine.complete_chat(messages, temperature=0, max_tokens=6)
    new_turn = engine.template.encode([{"role": "user", "content": "more"}])[1:]
    # the reply's last token was never fed, then EOS and the new user turn
    assert second.prefilled_tokens == len(new_turn) + 2
    assert second.prompt_tokens > 2 * second.prefilled_tokens - 10


def test_context_stays_bounded_in_long_generation(tiny_mixtral):
    engine = localmix.load(tiny_mixtral[0], device="cpu", dtype="fp32", context=16)
    s = engine.complete(list(range(3, 40)), temperature=0.8, seed=1, max_tokens=40)
    assert s.context_size == 16 and s.context_used == 16
    assert engine.cache.k.shape[2] == 16


@pytest.mark.parametrize(
    ("window", "capacity", "sinks"), [(8, 8, 0), (8, 8, 2), (8, 12, 0), (8, 12, 3), (6, 20, 1)]
)
def test_one_token_step_is_single_exactly_when_every_key_is_visible(window, capacity, sinks):
    """A one-token step takes the Python-integer bookkeeping (`single`) exactly when the mask of
    the general case would let it see every key, and then writes where that case writes."""
    cache = RollingKVCache(1, 1, 8, window, sinks=sinks, capacity=capacity)
    for pos in range(3 * capacity):
        with cache.step(1) as step:
            new = torch.full((1, 1, 8), float(pos))
            _, _, mask = step.update_and_fetch(0, new, new)
            single = step.single(0)
        keys = cache.slot_pos[: step.used]  # the positions the new token attended
        visible = attention_allowed(torch.tensor([pos]), keys, window, sinks)
        assert (single is not None) == bool(visible.all()), pos
        if single is not None:
            _, _, slot, used = single
            assert mask is None and used == step.used and int(cache.slot_pos[slot]) == pos
            assert cache.k[0, 0, slot, 0] == pos
