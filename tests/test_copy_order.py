"""The slot mover's ordering, checked with a fake copy engine that delays every copy until the
compute asks for it and poisons the slot meanwhile: a read before its copy lands, or a copy over
a slot whose reader has not been marked done, shows up as wrong logits or a failed assertion."""

from __future__ import annotations

import pytest
import torch

import localmix
import localmix.offload as offload_module
from localmix.cpu_decode import KernelRouter
from localmix.model import Router
from localmix.offload import CopyJob
from tests.helpers import quantized_six_experts


class FakeCopies:
    """A copy engine whose copies land only when waited for; until then the slot holds NaNs."""

    def __init__(self) -> None:
        self.clock = 0
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # event -> dst, src
        self.readers: dict[int, int] = {}  # reader event -> time
        self.read_at: dict[int, int] = {}  # dst address -> last time the compute read it
        self.log: list[int] = []  # dst address of each copy, in order

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def copy(self, job: CopyJob) -> int:
        address = job.dst.data_ptr()
        if address in self.read_at:  # no overwrite under a reader
            assert job.after in self.readers, "a copy over a slot read, with no reader event"
            assert self.readers[job.after] >= self.read_at[address], "copy before its last reader"
        job.dst.fill_(0xFF)  # poison: bf16 NaNs until the copy lands
        event = self.tick()
        self.pending[event] = (job.dst, job.src.clone())
        self.log.append(address)
        return event

    def wait(self, event: object) -> None:
        if event is None:
            return
        dst, src = self.pending.pop(event)
        dst.copy_(src)
        self.read_at[dst.data_ptr()] = self.tick()

    def reader_done(self) -> int:
        event = self.tick()
        self.readers[event] = event
        return event


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    return quantized_six_experts(tmp_path_factory)


@pytest.mark.parametrize("prefetch", [0, 1])
def test_delayed_poisoned_copies_give_the_same_logits(quantized, prefetch, monkeypatch):
    ids = list(range(3, 30))
    plain = localmix.load(quantized, device="cpu")
    reference = plain.logits(ids)
    greedy = plain.complete(ids, temperature=0, max_tokens=6).token_ids
    engines: list[FakeCopies] = []
    monkeypatch.setattr(
        offload_module, "ImmediateCopies", lambda: engines.append(FakeCopies()) or engines[-1]
    )
    e = localmix.load(quantized, device="cpu", expert_slots=3, prefetch=prefetch)
    assert torch.equal(e.logits(ids), reference)
    e.reset()
    assert e.complete(ids, temperature=0, max_tokens=6).token_ids == greedy
    assert len(engines) == 1 and len(engines[0].log) > 0


def test_demand_copies_are_queued_before_prefetches(quantized, monkeypatch):
    """While layer L is served, the copies it needs go to the copy engine before the copies
    predicted for layer L+1 (for the last layer: the next token's layer 0), so a miss never
    waits behind a guess."""
    engine = FakeCopies()
    monkeypatch.setattr(offload_module, "ImmediateCopies", lambda: engine)
    fetch = offload_module.CachedExperts.fetch

    def marked_fetch(self, layer, experts, hidden, predicted):
        engine.log.append(-1 - layer)  # a marker: layer L's fetch starts
        return fetch(self, layer, experts, hidden, predicted)

    monkeypatch.setattr(offload_module.CachedExperts, "fetch", marked_fetch)
    e = localmix.load(quantized, device="cpu", expert_slots=2, prefetch=1)
    layer_of = {}
    for layer, per_layer in enumerate(e.offload.mover.buffers):
        for slot in range(per_layer.shape[0]):
            layer_of[per_layer[slot].data_ptr()] = layer
    e.complete(list(range(3, 12)), temperature=0, max_tokens=12)
    fetches: list[tuple[int, list[int]]] = []
    for entry in engine.log:
        if entry < 0:
            fetches.append((-1 - entry, []))
        else:
            fetches[-1][1].append(layer_of[entry])
    prefetching = [(layer, copies) for layer, copies in fetches if layer + 1 in copies]
    assert len(prefetching) > 3  # decode steps that prefetched
    for layer, copies in prefetching:
        assert copies == sorted(copies) and set(copies) <= {layer, layer + 1}, (layer, copies)
    # the last layer predicts the next token's first layer, again behind its own copies
    assert e.offload.cache.stats.layers[0].predicted > 0
    last = len(e.offload.mover.buffers) - 1
    for copies in [copies for layer, copies in fetches if layer == last]:
        assert copies == sorted(copies, key=lambda layer: layer == 0), copies


@pytest.mark.parametrize("kernel_router", [False, True])
def test_a_decode_step_reads_the_device_once_per_layer(quantized, monkeypatch, kernel_router):
    """Routing and the prefetch prediction come to the host together: one synchronisation per
    MoE layer in a decode step (where the prediction, read separately, made a second). The
    model's own router is the one a GPU runs; the CPU's kernel router reads no tensor for the
    routing it computes, only the prediction."""
    e = localmix.load(quantized, device="cpu", expert_slots=3, prefetch=1)
    for moe in e.model.moe_layers():
        assert isinstance(moe.router, KernelRouter)
        if not kernel_router:
            moe.router = Router(moe.top_k)
    e.complete(list(range(3, 12)), temperature=0, max_tokens=2)  # warm: prefill + a step
    reads = []
    tolist = torch.Tensor.tolist

    def counted(self):
        reads.append(tuple(self.shape))
        return tolist(self)

    model = e.model
    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    with torch.inference_mode():  # one decode step: the model on the engine's own cache
        model(torch.tensor([5]), e.cache, last_only=True)
    layers, k = model.cfg.num_hidden_layers, model.cfg.num_experts_per_tok
    # a layer reads its k ids and k weights, and the k ids it predicts for the next layer
    assert reads == [((1 if kernel_router else 3) * k,)] * layers, reads


def test_the_routing_record_is_one_read(quantized, monkeypatch):
    """The TUI's per-token routing record comes from the device in one read, not one a layer,
    and says what each layer chose for the last token."""
    e = localmix.load(quantized, device="cpu")
    e.complete(list(range(3, 12)), temperature=0, max_tokens=2)
    expected = [chosen[-1].tolist() for chosen in e.routing.chosen.values()]
    reads = []
    tolist = torch.Tensor.tolist

    def counted(self):
        reads.append(tuple(self.shape))
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    assert e.expert_routing() == expected
    assert reads == [(e.config.num_hidden_layers, e.config.num_experts_per_tok)]
