"""Expert offloading: identical outputs, the plan, the cache's accounting, trace replay."""

from __future__ import annotations

import json

import pytest
import torch
from localmix.cli.main import app
from localmix.quant.convert import Settings, convert
from typer.testing import CliRunner

import localmix
from localmix.errors import MemoryBudgetError
from localmix.events import Summary
from localmix.expert_cache import ExpertCache, OffloadStats, make_policy
from localmix.trace import read_trace, replay
from tests.helpers import TRACE, save_reference, tiny_mixtral_config


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    src = tmp_path_factory.mktemp("osrc")
    save_reference(
        src,
        tiny_mixtral_config(hidden=128, intermediate=256, experts=6, layers=3),
        dtype=torch.bfloat16,
    )
    dst = tmp_path_factory.mktemp("oq") / "q"
    convert(src, dst, Settings(method="rtn"))
    return src, dst


IDS = list(range(3, 45))


@pytest.mark.parametrize("which", ["quantized", "bf16"])
def test_offloaded_outputs_are_bit_identical(quantized, which):
    path = quantized[1] if which == "quantized" else quantized[0]
    plain = localmix.load(path, device="cpu")
    logits = plain.logits(IDS)
    greedy = plain.complete(IDS, temperature=0, max_tokens=10).token_ids
    for slots in (2, 3, 6):  # top_k .. all experts
        for policy in ("lru", "transition"):
            for prefetch in (0, 2):
                e = localmix.load(
                    path, device="cpu", expert_slots=slots, policy=policy, prefetch=prefetch
                )
                assert torch.equal(e.logits(IDS), logits), (slots, policy, prefetch)
                assert e.complete(IDS, temperature=0, max_tokens=10).token_ids == greedy
                check_accounting(e)


def check_accounting(engine):
    cache = engine.offload.cache
    for layer, slots in enumerate(cache.slots):
        held = [e for e in slots if e >= 0]
        assert len(held) == len(set(held))  # never two device copies of one expert
        assert {e: s for s, e in enumerate(slots) if e >= 0} == cache.where[layer]
    device_bytes = sum(b.nbytes for b in engine.offload.mover.buffers)
    assert device_bytes == sum(engine.plan.slots) * engine.plan.expert_bytes
    assert engine.plan.device_bytes <= (engine.plan.budget or engine.plan.device_bytes)


def test_budget_plan_and_refusal(quantized):
    e = localmix.load(quantized[1], device="cpu", expert_slots=6)
    plan = e.plan
    minimum = sum(plan.trunk.values()) + plan.kv_cache + 3 * 2 * plan.expert_bytes
    with pytest.raises(MemoryBudgetError, match="short of"):
        localmix.load(quantized[1], device="cpu", device_memory=minimum - 1)
    tight = localmix.load(quantized[1], device="cpu", device_memory=minimum + plan.expert_bytes)
    assert tight.plan.slots == [2, 2, 3]  # the spare slot goes to the last layer
    assert tight.plan.device_bytes <= minimum + plan.expert_bytes
    d = tight.plan.to_dict()
    assert d["slots"] == [2, 2, 3] and d["host_bytes"] == 3 * 6 * plan.expert_bytes
    assert "expert slots" in str(tight.plan) and "host RAM" in str(tight.plan)
    check_accounting(tight)


def test_prefill_streams_each_expert_once_per_chunk(quantized):
    e = localmix.load(quantized[1], device="cpu", expert_slots=2, prefetch=0)
    e.logits(IDS)  # 42 tokens touch all 6 experts of each layer, with 2 slots
    stats = e.offload.cache.stats
    for layer in stats.layers:
        assert layer.loads == 6 and layer.misses == 6


def test_stats_reach_events_and_cli(quantized):
    e = localmix.load(quantized[1], device="cpu", expert_slots=3, prefetch=1)
    summary = e.complete(IDS, temperature=0, max_tokens=8)
    s = summary.to_dict()["stats"]
    for key in (
        "hit_rate",
        "loads_per_token",
        "bytes_per_token",
        "prefetch_precision",
        "prefetch_recall",
        "per_layer",
    ):
        assert key in s
    assert len(s["per_layer"]) == 3 and s["tokens"] == len(IDS) + 7
    assert 0 < s["hit_rate"] < 1 and s["bytes_per_token"] > 0


def test_stats_keep_their_json_shape_and_read_back():
    """run --json, the server's closing chunk and /health write the stats as a flat object
    with `per_layer` last; a client reads them back into the same values."""
    cache = ExpertCache([2, 3], make_policy("lru"), None, 10)
    list(cache.request(0, [0, 1]))
    list(cache.request(1, [1, 2]))
    stats = cache.report()
    data = json.loads(json.dumps(stats.to_dict()))
    assert list(data) == [
        "hit_rate",
        "computed_on_host",
        "prefetch_hits",
        "loads_per_token",
        "bytes_per_token",
        "bytes_moved",
        "prefetch_precision",
        "prefetch_recall",
        "tokens",
        "per_layer",
    ]
    assert data["bytes_moved"] == 40 and data["tokens"] == 1
    assert data["per_layer"][1] == {
        "slots": 3,
        "hits": 0,
        "misses": 2,
        "prefetch_hits": 0,
        "loads": 2,
    }
    assert OffloadStats.from_dict(data) == stats
    summary = Summary(2, 2, 1, "a", [5], 0.1, 20.0, 0.0, "length", 3, 64, stats)
    assert Summary.from_dict(json.loads(json.dumps(summary.to_dict()))) == summary
    plain = Summary(2, 2, 1, "a", [5], 0.1, 20.0, 0.0, "length", 3, 64)
    assert plain.to_dict()["stats"] == {} and Summary.from_dict(plain.to_dict()) == plain


def test_trace_replay_matches_known_figures():
    trace, layers, experts = read_trace(TRACE)
    assert (layers, experts) == (32, 8)
    rate = {}
    for slots in (2, 3, 4):
        for policy in ("lru", "transition", "belady"):
            rate[policy, slots] = replay(trace, layers, slots, policy, None, 1).hit_rate
    assert rate["lru", 2] == pytest.approx(0.397, abs=0.001)
    assert rate["lru", 3] == pytest.approx(0.52, abs=0.01)
    assert rate["lru", 4] == pytest.approx(0.62, abs=0.01)
    assert [round(rate["belady", k], 3) for k in (2, 3, 4)] == [0.397, 0.620, 0.747]
    assert rate["transition", 2] == pytest.approx(rate["lru", 2])  # all demand policies equal
    assert rate["transition", 3] > rate["lru", 3] + 0.015
    assert rate["transition", 4] > rate["lru", 4] + 0.015
    with_prefetch = replay(trace, layers, 3, "transition", "cross-layer", 1)
    assert with_prefetch.hit_rate > rate["transition", 3]
    assert 0 < with_prefetch.prefetch_precision < 1


def test_bench_cache_command():
    r = CliRunner().invoke(app, ["bench-cache", "--trace", str(TRACE), "--slots", "3", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert {"hit_rate", "loads_per_token", "bytes_per_token"} <= set(data)
    assert data["bytes_per_token"] == pytest.approx(data["loads_per_token"] * 99090432)
    r = CliRunner().invoke(
        app, ["bench-cache", "--trace", str(TRACE), "--slots", "4", "--predictor", "cross-layer"]
    )
    assert r.exit_code == 0 and "offline optimum 0.747" in r.stdout
    r = CliRunner().invoke(app, ["bench-cache", "--trace", "/nonexistent", "--slots", "2"])
    assert r.exit_code == 1 and "not a routing trace" in r.stderr


@pytest.mark.gpu
def test_offloaded_on_cuda_matches_and_stays_in_budget(quantized):
    plain = localmix.load(quantized[1], device="cuda")
    logits = plain.logits(IDS)
    del plain
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    e = localmix.load(quantized[1], device="cuda", device_memory="900MB", expert_slots=3)
    got = e.logits(IDS)
    e.complete(IDS, temperature=0, max_tokens=8)
    assert torch.equal(got, logits)
    assert torch.cuda.max_memory_allocated() - before <= e.plan.budget
    assert e.offload.store.host.is_pinned()


def test_host_store_is_pinned_in_layer_blocks_and_reports_progress(quantized):
    """Each layer's block is page-locked where it lies, exactly its size (PyTorch's pinned
    allocator would round 23.6 GB up to 32); a block that cannot be locked stays pageable
    (the CUDA copy engine stages it), and filling the store reports progress per expert."""
    from localmix.offload import ExpertStore

    plain = localmix.load(quantized[1], device="cpu")
    blocks, progress = [], []

    def pinner(block):
        blocks.append((block.data_ptr(), block.nbytes))
        return len(blocks) == 1  # only the first layer can be locked

    store = ExpertStore(plain.model, torch.device("cpu"), pinner, lambda d, t: progress.append(d))
    layers, experts, expert_bytes = store.host.shape
    assert store.pinned == [True] + [False] * (layers - 1)
    assert [n for _, n in blocks] == [experts * expert_bytes] * layers
    assert [p for p, _ in blocks] == [store.host[i].data_ptr() for i in range(layers)]
    assert progress == list(range(1, layers * experts + 1))
    # the store holds each expert's bytes: a module bound to a row computes what the original does
    x = torch.randn(2, plain.config.hidden_size).bfloat16()
    original = plain.model.moe_layers()[1].experts[4]
    assert torch.equal(store.module(1, 4)(x), original(x))


def test_load_reports_the_host_store_filling(quantized):
    seen = []
    e = localmix.load(
        quantized[1], device="cpu", expert_slots=3, progress=lambda d, t: seen.append((d, t))
    )
    total = e.config.num_hidden_layers * e.config.num_local_experts
    assert seen == [(i, total) for i in range(1, total + 1)]
