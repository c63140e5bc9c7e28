"""Placement plans from what the machine has: Mixtral-8x7B's real shapes (built on the meta
device, no weights), against mocked free device memory and host RAM."""

from __future__ import annotations

import json

import pytest
import torch

import localmix
from localmix.config import MIXTRAL_8X7B, ModelConfig
from localmix.errors import MemoryBudgetError
from localmix.offload import Machine, plan_for
from tests.helpers import save_reference, tiny_mixtral_config

GiB = 1024**3
Q4 = {"bits": 4, "group_size": 64, "method": "wmse", "attn": "bf16", "lm_head": "bf16"}
# What CUDA leaves free on an idle card once the context exists (measured on such cards).
CARDS = {12: 11.76, 16: 15.6, 24: 23.65}


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral-config")
    (path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    return ModelConfig.from_file(path)


@pytest.mark.parametrize("card", sorted(CARDS))
def test_plan_fits_what_the_card_has_free(mixtral, card):
    free = int(CARDS[card] * GiB)
    plan = plan_for(mixtral, Q4, None, "cuda", 4096, machine=Machine(free, 60 * GiB))
    assert plan.device_bytes <= free  # never more than is free
    assert plan.expert_bytes == 99090432  # 4-bit g64 w1, w3, w2 of 14336x4096
    assert not plan.all_resident
    assert min(plan.slots) >= 2 and max(plan.slots) - min(plan.slots) <= 1
    # the room left after the slots is less than one more expert: nothing wasted
    assert free - plan.device_bytes < plan.expert_bytes
    assert plan.reserve["prefill activations"] > 0 and plan.reserve["allocator, cuBLAS"] > 0
    # the README's own "--device-memory 12GB" is capped at what a 12 GB card has free
    capped = plan_for(mixtral, Q4, 12 * GiB, "cuda", 4096, machine=Machine(free, 60 * GiB))
    assert capped.device_bytes <= free
    if card == 12:
        assert "capped" in str(capped)


def test_a_card_that_cannot_hold_the_minimum_is_refused_with_numbers(mixtral):
    machine = Machine(int(6 * GiB), 60 * GiB)
    with pytest.raises(MemoryBudgetError, match=r"free on the device.*GiB short of"):
        plan_for(mixtral, Q4, None, "cuda", 4096, machine=machine)
    # a longer context's KV cache counts: 32k tokens no longer fit beside two slots a layer
    with pytest.raises(MemoryBudgetError, match="KV cache"):
        plan_for(mixtral, Q4, None, "cuda", 32768, machine=Machine(int(11.76 * GiB), 60 * GiB))


def test_host_ram_is_checked_and_named(mixtral):
    with pytest.raises(MemoryBudgetError, match="host RAM: the experts need 23.62 GiB"):
        plan_for(mixtral, Q4, None, "cuda", 4096, machine=Machine(int(11.76 * GiB), 16 * GiB))


def test_a_model_that_fits_stays_whole_on_the_card(mixtral):
    """An 80 GB card holds every expert: nothing is offloaded, and host RAM is not needed."""
    plan = plan_for(mixtral, Q4, None, "cuda", 4096, machine=Machine(79 * GiB, 8 * GiB))
    assert plan.all_resident


def test_older_gpus_reserve_dequantize_scratch(mixtral):
    free = Machine(int(11.76 * GiB), 60 * GiB)
    fused = plan_for(mixtral, Q4, None, "cuda", 4096, machine=free)
    older = plan_for(mixtral, Q4, None, "cuda", 4096, machine=free, fused_int4=False)
    # a 14336x4096 expert matrix in bf16, plus 512 rows of float32 temporaries
    assert older.reserve["dequantize scratch"] >= 14336 * 4096 * 2
    assert fused.reserve["dequantize scratch"] == 0
    assert sum(older.slots) <= sum(fused.slots)


def test_a_larger_context_replans_and_is_refused_when_slots_would_shrink(tmp_path):
    src = tmp_path / "src"
    save_reference(src, tiny_mixtral_config(layers=2), dtype=torch.bfloat16)
    probe = localmix.load(src, device="cpu", expert_slots=4, context=64)
    budget = probe.plan.device_bytes  # exactly what 4 slots a layer and a 64-token cache take
    e = localmix.load(src, device="cpu", device_memory=budget, context=64)
    assert e.plan.slots == [4, 4]
    e.set_context(32)  # a smaller cache fits
    assert e.context == 32
    with pytest.raises(MemoryBudgetError, match="context of 512 tokens"):
        e.set_context(512)
    assert e.context == 32  # nothing changed
    assert e.complete("x", max_tokens=2, temperature=0).generated_tokens == 2
