"""Hybrid expert execution: the per-miss choice, its cost model on a fake clock, the decode
simulator, and the runtime with the "device" a CPU pool (results identical to resident decode,
bit for bit: the same kernels run on the same bytes)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import localmix
import localmix.offload as offload_module
from localmix.config import MIXTRAL_8X7B, ModelConfig
from localmix.expert_cache import ExpertCache, make_policy
from localmix.hybrid import (
    MACHINES,
    Costs,
    Scheduler,
    Speeds,
    bundled_routing,
    cached_speeds,
    machine_speeds,
    predict_plans,
    remember_speeds,
    routing_for,
    simulate,
)
from localmix.offload import Machine, plan_for
from tests.helpers import quantized_six_experts

MS = 1e-3


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def costs(copy: float, cpu: float, device: float = 0.5, handoff: float = 0.05) -> Costs:
    return Costs(copy * MS, cpu * MS, device * MS, handoff * MS)


def no_value(expert: int) -> float:
    return 0.0


# -- the choice -----------------------------------------------------------------------------


def test_a_miss_goes_where_the_cost_model_says_and_flips_at_the_break_even_point():
    """One miss beside one resident expert: the copy costs copy + device time, the CPU costs
    the hand-off + its time; the choice flips where they cross."""
    device, handoff = 0.5, 0.05
    copy = 4.0
    break_even = copy + device - handoff  # CPU time at which both finish together
    for cpu in (1.0, 2.0, break_even - 0.01):
        s = Scheduler(costs(copy, cpu, device, handoff), "hybrid", FakeClock())
        assert s.choose([3], 1, no_value) == [3], cpu
    for cpu in (break_even + 0.01, 6.0, 10.0):
        s = Scheduler(costs(copy, cpu, device, handoff), "hybrid", FakeClock())
        assert s.choose([3], 1, no_value) == [], cpu


def test_a_busy_link_sends_a_miss_to_the_cpu():
    """The same miss that is copied on an idle link goes to the CPU behind a backlog of
    copies, and back to the link once the clock has passed it."""
    clock = FakeClock()
    s = Scheduler(costs(copy=2.0, cpu=3.0), "hybrid", clock)
    assert s.choose([5], 1, no_value) == []
    lands = s.queued(3)  # three copies queued now: 6 ms of backlog
    assert lands == pytest.approx([2 * MS, 4 * MS, 6 * MS])
    assert s.backlog() == pytest.approx(6 * MS)
    assert s.choose([5], 1, no_value) == [5]
    clock.now = 6 * MS
    assert s.backlog() == 0.0
    assert s.choose([5], 1, no_value) == []


def test_two_misses_are_split_between_link_and_cpu_when_that_finishes_first():
    """Both misses on the CPU take twice its time; both copied, twice the link's; one each
    runs in parallel, which the model prefers when it is the shortest."""
    s = Scheduler(costs(copy=3.0, cpu=3.0, device=0.2), "hybrid", FakeClock())
    assert len(s.choose([1, 2], 0, no_value)) == 1
    s = Scheduler(costs(copy=10.0, cpu=1.0), "hybrid", FakeClock())
    assert sorted(s.choose([1, 2], 0, no_value)) == [1, 2]
    s = Scheduler(costs(copy=1.0, cpu=10.0), "hybrid", FakeClock())
    assert s.choose([1, 2], 0, no_value) == []


def test_expected_reuse_tips_a_close_call_toward_the_copy():
    """A copy that the cache will likely hit again is worth more than its finishing time."""
    c = costs(copy=4.0, cpu=4.2, device=0.5)  # the CPU finishes slightly sooner
    s = Scheduler(c, "hybrid", FakeClock())
    assert s.choose([7], 0, no_value) == [7]
    assert s.choose([7], 0, lambda e: 0.9) == []


def test_fixed_modes_never_choose():
    c = costs(copy=1.0, cpu=100.0)
    assert Scheduler(c, "cpu", FakeClock()).choose([1, 2], 0, no_value) == [1, 2]
    c = costs(copy=100.0, cpu=1.0)
    assert Scheduler(c, "gpu", FakeClock()).choose([1, 2], 0, no_value) == []
    with pytest.raises(ValueError, match="unknown experts mode"):
        Scheduler(c, "tpu")


def test_the_cpu_and_the_device_work_in_parallel_on_the_virtual_clock():
    """Copy 4 ms, CPU 2 ms, device 1 ms. Token 1, empty cache: both experts on the CPU (4 ms),
    one of them copied behind. Token 2: that one is resident (1 ms on the device) while the
    CPU computes the other (2 ms): the layer takes 2 ms, not 3."""
    speeds = Speeds(link_gbps=1.0, cpu_gbps=2.0, device_gbps=4.0, handoff_s=0.0)
    p = simulate([{0: [0, 1]}, {0: [0, 1]}], [2], 4_000_000, speeds, "hybrid")
    assert p.seconds["experts"] == pytest.approx((4e-3 + 2e-3) / 2)
    assert p.on_cpu_per_token == 1.5 and p.copies_per_token == 1.0  # both copied behind
    cpu_only = simulate([{0: [0, 1]}, {0: [0, 1]}], [2], 4_000_000, speeds, "cpu")
    assert cpu_only.seconds["experts"] == pytest.approx(4e-3)


# -- the expert cache's side ----------------------------------------------------------------


def test_experts_computed_elsewhere_count_as_misses_and_take_no_slot():
    cache = ExpertCache([2], make_policy("lru"))
    assert list(cache.request(0, [1, 2], 1, elsewhere=[2])) == [(1, 0)]
    s = cache.stats.layers[0]
    assert (s.hits, s.misses, s.elsewhere, s.loads) == (0, 2, 1, 1)
    assert cache.resident(0) == [1]
    assert cache.load_behind(0, [2], [1, 2]) == 1  # joins the cache behind the layer's work
    assert cache.resident(0) == [1, 2]
    assert list(cache.request(0, [1, 2])) == [(1, 0), (2, 1)]
    assert cache.stats.summary().computed_on_host == 1


def test_copy_value_is_the_reuse_gained_over_the_evicted_expert():
    cache = ExpertCache([2], make_policy("transition"))
    for _ in range(20):  # {0, 1} again and again, then once {2, 3}, which take the slots
        list(cache.request(0, [0, 1]))
    list(cache.request(0, [2, 3]))
    assert cache.resident(0) == [2, 3]
    # served now for [0, 1]: 0 is likely used again next, far more than 2 or 3
    assert cache.copy_value(0, 0, [0, 1]) > 0.5
    assert cache.copy_value(0, 5, [0, 1]) == 0.0  # never seen: worth no more than a victim
    assert ExpertCache([2], make_policy("lru")).copy_value(0, 2, [0, 1]) == 0.0


# -- the simulator --------------------------------------------------------------------------


def mixtral_plan(spec_key: str, mode: str):
    spec = MACHINES[spec_key]
    cfg = ModelConfig.from_dict(MIXTRAL_8X7B)
    q = {"bits": 4, "group_size": 64, "method": "rtn", "attn": "bf16", "lm_head": "bf16"}
    machine = Machine(int(spec.usable_gib * 1024**3), 64 * 1024**3)
    return plan_for(cfg, q, None, "cuda", 4096, torch.bfloat16, machine=machine, mode=mode)


def test_the_simulator_predicts_hybrid_well_above_pure_offload_on_a_12gb_card():
    """Mixtral's real routing, a 12 GB PCIe 4.0 card (24 GB/s), a 50 GB/s host whose CPU
    kernel reads at the RAM's speed: hybrid predicts at least 1.8x copying every miss, and
    beats computing every expert on the CPU too."""
    spec = MACHINES["rtx3060"]
    tokens = bundled_routing()[:160]
    out = {}
    for mode in ("gpu", "hybrid", "cpu"):
        plan = mixtral_plan("rtx3060", mode)
        speeds = spec.speeds(cpu_efficiency=1.0).with_trunk(plan.trunk, 32)
        out[mode] = simulate(tokens, plan.slots, plan.expert_bytes, speeds, mode)
    assert out["cpu"].slots_per_layer == 0 and out["cpu"].hit_rate == 0
    assert out["hybrid"].on_cpu_per_token > 10 and out["gpu"].on_cpu_per_token == 0
    assert out["hybrid"].tokens_per_s >= 1.8 * out["gpu"].tokens_per_s
    assert out["hybrid"].tokens_per_s > 1.4 * out["cpu"].tokens_per_s


def test_with_a_cache_that_holds_most_experts_hybrid_is_not_slower_than_copying():
    """On a 24 GB card most experts stay resident; the CPU takes only the misses and the
    link still fills the cache behind them."""
    spec = MACHINES["rtx4090"]
    tokens = bundled_routing()[:160]
    out = {}
    for mode in ("gpu", "hybrid"):
        plan = mixtral_plan("rtx4090", mode)
        speeds = spec.speeds(cpu_efficiency=0.8).with_trunk(plan.trunk, 32)
        out[mode] = simulate(tokens, plan.slots, plan.expert_bytes, speeds, mode)
    assert out["hybrid"].tokens_per_s >= out["gpu"].tokens_per_s
    assert out["hybrid"].hit_rate > 0.8 * out["gpu"].hit_rate


def test_routing_for_other_shapes_is_said_to_be_synthetic():
    tokens, source = routing_for(4, 8, 2)
    assert "Mixtral" in source and all(set(t) <= set(range(4)) for t in tokens)
    tokens, source = routing_for(3, 6, 2)
    assert "uniform" in source and all(len(t[0]) == 2 and max(t[0]) < 6 for t in tokens)


# -- speeds of this machine -----------------------------------------------------------------


def test_speeds_are_measured_once_per_machine_and_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path))
    from localmix.model import Expert

    expert = Expert(64, 128).to(torch.bfloat16)
    first = machine_speeds(lambda: expert, "cpu", 64, torch.bfloat16, 123)
    assert first.cpu_gbps > 0 and first.link_gbps > 0 and first.device_gbps > 0
    key = next(iter(json.loads((tmp_path / "speeds.json").read_text())))
    assert "123 B" in key
    remembered = cached_speeds(key)
    assert remembered is not None and remembered.cpu_gbps == first.cpu_gbps
    again = machine_speeds(lambda: expert, "cpu", 64, torch.bfloat16, 123)
    assert again.cpu_gbps == first.cpu_gbps  # not measured twice
    (tmp_path / "speeds.json").write_text("not json")
    assert cached_speeds(key) is None  # a damaged file is measured again, not an error
    good = json.loads(json.dumps({key: dataclasses.asdict(first)}))
    for field, bad in (
        ("link_gbps", 0),
        ("cpu_gbps", -1.0),
        ("device_gbps", "fast"),
        ("handoff_s", -0.1),
        ("layer_s", 1e999),
        ("token_s", True),
        ("link_gbps", None),
    ):
        (tmp_path / "speeds.json").write_text(json.dumps({key: {**good[key], field: bad}}))
        assert cached_speeds(key) is None, (field, bad)  # measured again, never divided by
    (tmp_path / "speeds.json").write_text(json.dumps({key: {**good[key], "extra": 1}}))
    assert cached_speeds(key) is None
    (tmp_path / "speeds.json").write_text(json.dumps(["a list"]))
    assert cached_speeds(key) is None
    remember_speeds(key, first)
    assert cached_speeds(key) is not None


# -- the runtime, the "device" a CPU pool ---------------------------------------------------


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    return quantized_six_experts(tmp_path_factory)


def speeds_favouring(where: str) -> Speeds:
    if where == "cpu":
        return Speeds(link_gbps=1e-6, cpu_gbps=1e6, device_gbps=1e3, handoff_s=0.0)
    if where == "link":
        return Speeds(link_gbps=1e6, cpu_gbps=1e-6, device_gbps=1e3, handoff_s=0.0)
    return Speeds(link_gbps=1.0, cpu_gbps=1.0, device_gbps=1e3, handoff_s=0.0)


@pytest.mark.parametrize(
    "mode, favour", [("hybrid", "cpu"), ("hybrid", "even"), ("cpu", "cpu"), ("gpu", "link")]
)
def test_hybrid_decode_gives_the_resident_logits_bit_for_bit(quantized, mode, favour):
    ids = list(range(3, 30))
    plain = localmix.load(quantized, device="cpu")
    greedy = plain.complete(ids, temperature=0, max_tokens=8)
    e = localmix.load(quantized, device="cpu")
    e.offload_experts(None, 2, "transition", 1, experts=mode, speeds=speeds_favouring(favour))
    assert e.offload.mode == mode
    out = e.complete(ids, temperature=0, max_tokens=8)
    assert out.token_ids == greedy.token_ids
    step = [greedy.token_ids[0]]
    e.reset(), plain.reset()
    assert torch.equal(e.logits(ids + step), plain.logits(ids + step))  # prefill: device only
    stats = e.offload.cache.stats.summary()
    if mode == "gpu":
        assert stats.computed_on_host == 0
    else:
        assert stats.computed_on_host > 0
    if mode == "cpu":
        assert e.plan.slots == [0, 0, 0] and "on the CPU" in str(e.plan)


def test_the_cpu_starts_before_the_device_computes(quantized, monkeypatch):
    """A layer's CPU work is submitted before the first device expert is served, and its
    results are served last: the two overlap."""
    log = []
    submit = offload_module.HostExperts.submit

    def logged_submit(self, layer, experts, x):
        log.append(("cpu", layer))
        return submit(self, layer, experts, x)

    monkeypatch.setattr(offload_module.HostExperts, "submit", logged_submit)
    e = localmix.load(quantized, device="cpu")
    e.offload_experts(None, 2, "lru", 0, experts="hybrid", speeds=speeds_favouring("even"))
    fetch = offload_module.CachedExperts.fetch

    def logged_fetch(self, layer, experts, hidden, predicted):
        for expert, module in fetch(self, layer, experts, hidden, predicted):
            where = "host" if isinstance(module, offload_module.Computed) else "device"
            log.append((where, layer))
            yield expert, module

    monkeypatch.setattr(offload_module.CachedExperts, "fetch", logged_fetch)
    e.complete(list(range(3, 12)), temperature=0, max_tokens=10)
    mixed = 0
    for layer in range(3):
        entries = [w for w, li in log if li == layer]
        for i, w in enumerate(entries):
            if w == "cpu" and "device" in entries[i + 1 : i + 3]:
                window = entries[i + 1 : i + 4]
                assert window.index("device") < window.index("host")
                mixed += 1
    assert mixed > 0


def test_auto_picks_gpu_on_a_cpu_device_and_unknown_modes_are_refused(quantized):
    e = localmix.load(quantized, device="cpu", expert_slots=2)
    assert e.offload.mode == "gpu" and e.predictions == {}
    with pytest.raises(localmix.LocalmixError, match="unknown experts mode"):
        localmix.load(quantized, device="cpu", experts="npu")


def test_predictions_for_each_mode_on_a_named_machine():
    plan = {m: mixtral_plan("rtx4060ti", m) for m in ("gpu", "hybrid", "cpu")}
    speeds = MACHINES["rtx4060ti"].speeds(0.9)
    tokens = bundled_routing()[:64]
    predictions = {
        m: simulate(tokens, p.slots, p.expert_bytes, speeds.with_trunk(p.trunk, 32), m)
        for m, p in plan.items()
    }
    assert all(p.tokens_per_s > 0 for p in predictions.values())
    same = predict_plans(ModelConfig.from_dict(MIXTRAL_8X7B), plan, speeds)
    assert set(same) == {"gpu", "cpu", "hybrid"}


def test_copies_through_the_staging_buffer_land_repacked_in_their_slot(quantized, monkeypatch):
    """Hybrid on CUDA keeps the host store in the CPU kernels' layout: each copy lands in one
    staging buffer and `Repack.into` (queued behind it on the copy stream) writes the device's
    form into the slot. Here the device's form is made by a stand-in for the fused kernel's
    packing (the bytes of each tensor reversed; that packing itself is traced on a fake GPU
    in test_gpu_path) and the slot must hold exactly that."""
    import localmix.quant.linear as linear_module

    from localmix.offload import ImmediateCopies, Repack, SlotMover, views

    def reverse_bytes(module):
        for m in module.modules():
            for name, t in list(m.named_buffers(recurse=False)):
                if t.dtype == torch.uint8:
                    setattr(m, name, t.flip(-1).contiguous())

    monkeypatch.setattr(linear_module, "use_device_kernels", reverse_bytes)
    e = localmix.load(quantized, device="cpu")
    e.offload_experts(None, 2, "lru", 0, experts="hybrid", speeds=speeds_favouring("even"))
    store = e.offload.store
    repack = Repack(store, torch.device("cpu"))
    mover = SlotMover(store, [2, 2, 2], torch.device("cpu"), ImmediateCopies(), repack)
    mover.load(1, 4, 0)
    mover.load(1, 5, 1)
    stored = store.module(1, 5)
    host = dict(stored.named_parameters()) | dict(stored.named_buffers())
    slot = views(mover.buffers[1][1], repack.layout)
    for name, t in host.items():
        expected = t.flip(-1) if t.dtype == torch.uint8 else t
        assert torch.equal(slot[name], expected), name


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["hybrid", "cpu"])
def test_hybrid_on_cuda_matches_resident_decode(quantized, mode):
    """On a GPU the CPU's experts run other kernels than the device's: equal within bf16
    rounding, and the same greedy tokens on this tiny model."""
    ids = list(range(3, 30))
    plain = localmix.load(quantized, device="cuda")
    reference = plain.complete(ids, temperature=0, max_tokens=8)
    step = plain.logits(ids + reference.token_ids[:1])
    del plain
    e = localmix.load(quantized, device="cuda", expert_slots=2, experts=mode)
    assert e.offload.mode == mode and set(e.predictions) == {"gpu", "cpu", "hybrid"}
    got = e.complete(ids, temperature=0, max_tokens=8)
    assert got.token_ids == reference.token_ids
    assert torch.allclose(e.logits(ids + reference.token_ids[:1]), step, atol=0.05, rtol=0.05)
    assert e.offload.cache.stats.summary().computed_on_host > 0


def test_show_predicts_each_mode_for_a_model_not_loaded(tmp_path, monkeypatch, quantized):
    """`localmix show` on a GPU machine: each mode planned and predicted from speeds measured
    on an expert of random codes (here the "device" is the CPU), then remembered."""
    from localmix.config import ModelConfig
    from localmix.hybrid import modes_here
    from localmix.loader import read_manifest

    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path))
    cfg = ModelConfig.from_file(quantized)
    quantization = read_manifest(quantized)["quantization"]
    machine = Machine(None, 64 * 1024**3)
    line = modes_here(cfg, quantization, "cpu", 256, machine, torch.bfloat16)
    assert line.startswith("experts: ") and "the fastest predicted here" in line
    for mode in ("gpu", "cpu", "hybrid"):
        assert f"{mode} " in line.split("predicted decode tok/s:")[1]
    assert (tmp_path / "speeds.json").exists()


def test_run_verbose_says_where_experts_run_and_why(tmp_path, monkeypatch, quantized):
    from localmix.cli.main import app
    from typer.testing import CliRunner

    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path))
    args = ["run", str(quantized), "Hi", "--device", "cpu", "--slots", "2", "--max-tokens", "2"]
    r = CliRunner().invoke(app, [*args, "--experts", "hybrid", "-v", "--no-server"])
    assert r.exit_code == 0, r.output
    assert "experts: hybrid (per miss, copied or computed on the CPU), as asked" in r.stderr
    assert "predicted decode tok/s: " in r.stderr and "measured on this machine" not in r.stderr
    r = CliRunner().invoke(app, [*args, "--experts", "gpu", "-v", "--no-server"])
    assert "experts: gpu (copied to the device); nothing to choose" in r.stderr
    r = CliRunner().invoke(app, [*args, "--experts", "tpu", "--no-server"])
    assert r.exit_code != 0 and "unknown experts mode 'tpu'" in r.stderr


def test_guesses_are_held_back_while_the_link_is_busy(quantized):
    """With speeds to go by, a prefetch is queued only while less than one copy is ahead of
    it on the link (a queued copy cannot be taken back); without, every guess goes."""
    ids = list(range(3, 12))
    busy = Speeds(link_gbps=1e-6, cpu_gbps=1.0, device_gbps=1e3, handoff_s=0.0)  # copies: hours
    idle = Speeds(link_gbps=1e6, cpu_gbps=1.0, device_gbps=1e3, handoff_s=0.0)
    predicted = {}
    for name, speeds in (("busy", busy), ("idle", idle), ("unknown", None)):
        e = localmix.load(quantized, device="cpu")
        e.offload_experts(None, 2, "lru", 1, experts="gpu", speeds=speeds)
        e.complete(ids, temperature=0, max_tokens=6)
        predicted[name] = e.offload.cache.stats.total().predicted
    assert predicted["busy"] == 0
    assert predicted["idle"] > 0 and predicted["unknown"] == predicted["idle"]


def test_a_dropped_store_unlocks_its_memory_once(quantized, monkeypatch):
    """What was page-locked is unlocked before it is freed: at close(), or when the store is
    collected (a server that swaps models just drops the engine), and never twice."""
    import gc

    from localmix.offload import ExpertStore

    unlocked = []
    monkeypatch.setattr(offload_module, "cuda_host_register", lambda block: True)
    monkeypatch.setattr(offload_module, "cuda_host_unregister", lambda b: unlocked.append(b))
    plain = localmix.load(quantized, device="cpu")
    store = ExpertStore(plain.model, torch.device("cpu"), offload_module.cuda_host_register)
    assert unlocked == []
    layers = store.host.shape[0]
    del store
    gc.collect()
    assert len(unlocked) == layers
    store = ExpertStore(plain.model, torch.device("cpu"), offload_module.cuda_host_register)
    store.close()
    store.close()
    del store
    gc.collect()
    assert len(unlocked) == 2 * layers
