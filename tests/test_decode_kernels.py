"""The fused kernels of a CPU decode step (attention, router, MoE experts) against the PyTorch
ops they replace, on the CPU that runs the tests."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from localmix.quant import quantize_tensor
from localmix.quant.layers import replace
from localmix.quant.linear import CACHE_LINE, QuantLinear
from torch import nn

import localmix
from localmix.cpu_decode import (
    KernelAttention,
    KernelBlock,
    KernelExperts,
    KernelProjections,
    KernelRouter,
    adopt_children,
)
from localmix.model import (
    Attention,
    Block,
    GroupedAttention,
    ResidentExperts,
    Rotary,
    Router,
    apply_rotary,
    route,
)
from tests import test_kernels
from tests.helpers import quantized_six_experts

kernels, threads = test_kernels.kernels, test_kernels.threads  # the fixtures, shared


def reference_attention(q, k, v, cos, sin, keys, values, slot, used):
    """The model's one-token attention in PyTorch ops: RoPE on q and k, the cache write, SDPA
    over the first `used` slots, query head h on KV head h // (heads / kv_heads)."""
    kv, _, hd = keys.shape
    heads = q.numel() // hd
    rotated = apply_rotary(torch.cat([q.view(1, heads, hd), k.view(1, kv, hd)], 1), cos, sin)
    q, k = rotated.split([heads, kv], 1)
    keys[:, slot] = k[0]
    values[:, slot] = v.view(kv, hd)
    q = q.view(kv, heads // kv, hd)  # (kv, rep, hd)
    out = F.scaled_dot_product_attention(q[None], keys[None, :, :used], values[None, :, :used])
    return out.reshape(1, heads * hd)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("heads", "kv", "hd"), [(8, 2, 128), (4, 4, 8), (6, 3, 40), (6, 2, 16), (10, 2, 24)]
)
@pytest.mark.parametrize("n_threads", [1, 3])
def test_attend_one_is_rope_cache_write_and_sdpa(kernels, threads, dtype, heads, kv, hd, n_threads):
    """The fused decode attention writes the rotated key and the value exactly as the PyTorch ops
    do and attends as SDPA does (within the rounding of SDPA's bf16 probabilities), for contexts
    that fit one work item and contexts split among threads and merged."""
    threads(n_threads)
    gen = torch.Generator().manual_seed(heads * hd)
    capacity = 1200
    rope = Rotary(hd, 10000.0)
    for used in (1, 5, 100, 1100):
        cos, sin = rope.cos_sin(used + 7, 1, dtype)
        q, k, v = (torch.randn(1, n * hd, generator=gen).to(dtype) for n in (heads, kv, kv))
        keys, values = (torch.randn(kv, capacity, hd, generator=gen).to(dtype) for _ in range(2))
        want_keys, want_values = keys.clone(), values.clone()
        slot = used - 1
        want = reference_attention(q, k, v, cos, sin, want_keys, want_values, slot, used)
        got = kernels.attend_one(q, k, v, cos, sin, keys, values, slot, used)
        assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
        assert got.dtype == dtype and got.shape == want.shape
        tol = 1e-5 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_route_one_is_the_models_router(kernels, dtype):
    """route_one picks the experts `route` picks, highest weight first, with the weights `route`
    gives rounded to the logits' dtype."""
    gen = torch.Generator().manual_seed(3)
    for experts, top_k in ((8, 2), (8, 1), (6, 6), (64, 6)):
        for _ in range(20):
            logits = (torch.randn(1, experts, generator=gen) * 3).to(dtype)
            weights, chosen = route(logits, top_k)
            got = kernels.route_one(logits, top_k)
            assert [int(e) for e in got[:top_k]] == chosen[0].tolist()
            want = weights[0].to(dtype).double().tolist()
            assert got[top_k:] == pytest.approx(want, rel=1e-6, abs=1e-7)


def expert_tensors(dim: int, hidden: int, group_size: int, gen: torch.Generator) -> list:
    w1, w3 = (
        quantize_tensor(torch.randn(hidden, dim, generator=gen) / 16, group_size=group_size)
        for _ in range(2)
    )
    w2 = quantize_tensor(torch.randn(dim, hidden, generator=gen) / 16, group_size=group_size)
    return [t for w in (w1, w3, w2) for t in (w.qweight, w.scales_zeros)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_int4_moe_is_the_experts_combined_in_order(kernels, threads, dtype, group_size, n_threads):
    """int4_moe equals each expert's own kernel, weighted and summed in the order given, in the
    activations' dtype, bit for bit."""
    threads(n_threads)
    gen = torch.Generator().manual_seed(group_size + n_threads)
    experts = [expert_tensors(256, 640, group_size, gen) for _ in range(3)]
    x = torch.randn(1, 256, generator=gen).to(dtype)
    weights = [float(torch.tensor(w).to(dtype)) for w in (0.55, 0.3, 0.15)]
    want = torch.zeros(1, 256, dtype=dtype)
    for tensors, w in zip(experts, weights, strict=True):
        want += kernels.int4_swiglu(x, *tensors, group_size) * w
    assert torch.equal(kernels.int4_moe(x, experts, weights, group_size), want)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    return quantized_six_experts(tmp_path_factory)


def own_modules(engine, kinds: tuple[type, ...]) -> None:
    """Put the model's own modules back in place of the kernel ones of `kinds`."""
    model = engine.model
    for name, m in list(model.named_modules()):
        if isinstance(m, KernelProjections) and KernelProjections in kinds:
            replace(model, name, adopted(Attention, m))
        elif isinstance(m, KernelAttention) and KernelAttention in kinds:
            replace(model, name, GroupedAttention(m.layer, m.n_heads, m.n_kv, m.head_dim))
        elif isinstance(m, KernelRouter) and KernelRouter in kinds:
            replace(model, name, Router(m.top_k))
        elif isinstance(m, KernelExperts) and KernelExperts in kinds:
            replace(model, name, ResidentExperts(list(m)))
        elif isinstance(m, KernelBlock) and KernelBlock in kinds:
            replace(model, name, adopted(Block, m))


def adopted(cls: type[nn.Module], module: nn.Module) -> nn.Module:
    """A plain `cls` (the model's own class) over the submodules of the kernel `module`."""
    plain = cls.__new__(cls)
    adopt_children(plain, module)
    return plain


def decode(engine, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """The logits of one-token steps feeding `tokens` after `prompt`, through the model."""
    cache = engine.new_cache(64)
    with torch.inference_mode():
        engine.model(torch.tensor(prompt), cache, last_only=True)
        return [engine.model(torch.tensor([t]), cache, last_only=True)[-1] for t in tokens]


def test_a_loaded_cpu_model_decodes_on_the_kernels_as_on_its_own_modules(quantized):
    """A 4-bit model loaded on the CPU takes the fused decode modules, and its decode steps give
    the logits of the model's own modules: the experts' combine and the fused q/k/v product bit
    for bit, attention and routing within the rounding of SDPA's bf16 probabilities."""
    fused, plain, experts_only = (localmix.load(quantized, device="cpu") for _ in range(3))
    model = fused.model
    assert all(isinstance(m.experts, KernelExperts) for m in model.moe_layers())
    assert all(isinstance(m.router, KernelRouter) for m in model.moe_layers())
    assert all(isinstance(b.self_attn.attend, KernelAttention) for b in model.layers)
    assert all(isinstance(b.self_attn, KernelProjections) for b in model.layers)
    everything = (KernelBlock, KernelProjections, KernelAttention, KernelRouter, KernelExperts)
    own_modules(plain, everything)
    own_modules(experts_only, (KernelBlock, KernelAttention, KernelRouter))
    prompt, tokens = list(range(3, 40)), [5, 17, 2, 9, 30, 11]
    want = decode(plain, prompt, tokens)
    for got, expected in zip(decode(experts_only, prompt, tokens), want, strict=True):
        assert torch.equal(got, expected)  # int4_moe and int8_mm_many: exactly the model's own
    for got, expected in zip(decode(fused, prompt, tokens), want, strict=True):
        tol = 0.02 * float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=0.02, atol=tol)


def test_a_decode_block_is_its_kernel_modules_one_by_one(quantized):
    """A loaded CPU model runs each layer's decode step as one DecodeBlock call, which gives
    the bits and the routing of the same kernel modules called one by one from Python; steps it
    does not take (the prompt, float32) run the modules."""
    fused, apart = (localmix.load(quantized, device="cpu") for _ in range(2))
    assert all(isinstance(b, KernelBlock) for b in fused.model.layers)
    own_modules(apart, (KernelBlock,))
    prompt, tokens = list(range(3, 40)), [5, 17, 2, 9, 30, 11]
    for got, want in zip(decode(fused, prompt, tokens), decode(apart, prompt, tokens), strict=True):
        assert torch.equal(got, want)
    assert fused.routing.last_token() == apart.routing.last_token()
    assert all(b.decode_plan is not None for b in fused.model.layers)  # the fused path ran


def test_a_decode_block_is_made_again_for_new_modules_and_refuses_what_it_cannot_run(quantized):
    """The plan follows the modules: a move or a copy makes it again, with the same results,
    and replaced experts (an expert cache's) run Block's own forward."""
    engine, apart = (localmix.load(quantized, device="cpu") for _ in range(2))
    own_modules(apart, (KernelBlock,))
    prompt, tokens = list(range(3, 40)), [5, 17]
    want = decode(apart, prompt, tokens)
    block = engine.model.layers[0]
    assert isinstance(block, KernelBlock)
    first = block.plan()
    assert first is not None and block.plan() is first
    engine.model.to(torch.bfloat16)
    assert block.planned_for is None
    assert all(torch.equal(g, w) for g, w in zip(decode(engine, prompt, tokens), want, strict=True))
    engine.model = copy.deepcopy(engine.model)  # the plan (C++ pointers) is not copied
    assert engine.model.layers[0].decode_plan is None
    assert all(torch.equal(g, w) for g, w in zip(decode(engine, prompt, tokens), want, strict=True))
    block = engine.model.layers[0]
    moe = block.block_sparse_moe
    moe.use_experts(ResidentExperts(list(moe.experts)))  # no fused experts: Block's forward
    assert block.plan() is None


def test_quantized_weights_on_the_cpu_start_on_cache_lines(quantized):
    """A weight mapped from a file at an offset off a cache line is moved onto one (the kernels'
    loads would straddle two lines), with the same values; a loaded model's all are."""
    layer = QuantLinear(64, 32, bits=8)
    raw = torch.randint(-100, 100, (32 * 64 + 8,), dtype=torch.int8)
    layer.qweight = raw[8:].view(32, 64)  # 8 bytes past the allocation's start
    layer.scales_zeros = torch.ones(32, dtype=torch.bfloat16)
    assert layer.qweight.data_ptr() % CACHE_LINE != 0
    before = layer.qweight.clone()
    assert layer.align_to_cache_lines() and not layer.align_to_cache_lines()
    assert layer.qweight.data_ptr() % CACHE_LINE == 0 and torch.equal(layer.qweight, before)
    engine = localmix.load(quantized, device="cpu")
    for m in engine.model.modules():
        if isinstance(m, QuantLinear):
            assert m.qweight.data_ptr() % CACHE_LINE == 0
            assert m.scales_zeros.data_ptr() % CACHE_LINE == 0


@pytest.mark.parametrize("n_threads", [1, 3])
def test_int8_mm_many_is_each_product_side_by_side(kernels, threads, n_threads):
    """Several 8-bit weights times the same rows, in one call, equal each weight's own product,
    bit for bit (the query, key and value projections of a decode step)."""
    threads(n_threads)
    gen = torch.Generator().manual_seed(n_threads)
    widths = (96, 32, 32)
    weights = [torch.randint(-127, 128, (n, 128), generator=gen, dtype=torch.int8) for n in widths]
    scales = [torch.rand(n, generator=gen).to(torch.bfloat16) for n in widths]
    for rows in (1, 3):
        x = torch.randn(rows, 128, generator=gen).to(torch.bfloat16)
        want = torch.cat(
            [kernels.int8_mm(x, w, s) for w, s in zip(weights, scales, strict=True)], 1
        )
        assert torch.equal(kernels.int8_mm_many(x, weights, scales), want)
