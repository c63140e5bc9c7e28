"""localmix's own CPU kernels against plain PyTorch references, on the CPU that runs the tests."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from localmix.quant import quantize_tensor
from localmix.quant.kernels import ENV_SWITCH, cpu_kernels, unavailable_reason

from tests.test_quant import int4_reference, int8_activations


@pytest.fixture
def kernels():
    k = cpu_kernels()
    assert k is not None, unavailable_reason()  # CI machines have AVX2 and a compiler
    return k


@pytest.fixture
def threads():
    """Restores PyTorch's thread count after a test that sets it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def swiglu_reference(x: torch.Tensor, q1, q3, q2, group_size: int) -> torch.Tensor:
    """What the fused expert computes, in float64: for 16-bit x, x rounded to int8 per group for
    w1 and w3, and the gated hidden activations rounded likewise for w2; float32 x exactly."""
    gate = int4_reference(x, q1, group_size)
    h = torch.nn.functional.silu(gate) * int4_reference(x, q3, group_size)
    if x.dtype != torch.float32:
        h = int8_activations(h, group_size)
    return int4_reference(h.float(), q2, group_size)


def fused_swiglu(kernels, x: torch.Tensor, q1, q3, q2, group_size: int) -> torch.Tensor:
    """The kernels' int4_swiglu on the quantized w1, w3 and w2 of one expert."""
    parts = [t for q in (q1, q3, q2) for t in (q.qweight, q.scales_zeros)]
    return kernels.int4_swiglu(x, *parts, group_size)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_fused_expert_is_its_reference(kernels, threads, group_size, n_threads):
    """int4_swiglu against float64 math for 1 and 3 rows, bf16 and fp32 activations, with thread
    counts that divide the hidden groups unevenly (each thread quantizes its own groups)."""
    threads(n_threads)
    gen = torch.Generator().manual_seed(group_size + n_threads)
    dim, hidden = 256, 640  # 640 / group: 20, 10 or 5 groups among 1..3 threads
    q1, q3 = (
        quantize_tensor(torch.randn(hidden, dim, generator=gen), group_size=group_size)
        for _ in range(2)
    )
    q2 = quantize_tensor(torch.randn(dim, hidden, generator=gen) / 8, group_size=group_size)
    for rows in (1, 3):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(rows, dim, generator=gen).to(dtype)
            got = fused_swiglu(kernels, x, q1, q3, q2, group_size)
            expected = swiglu_reference(x, q1, q3, q2, group_size)
            assert got.dtype == dtype and got.shape == (rows, dim)
            tol = 1e-5 if dtype == torch.float32 else 2**-7
            atol = tol * float(expected.abs().max())
            torch.testing.assert_close(got.double(), expected, rtol=tol, atol=atol)


def test_many_rows_cross_the_row_chunks(kernels):
    """A prefill's many rows go through the kernels a cache-sized chunk of rows at a time (8 rows
    for 2048 columns): an odd count across several chunks, against float64 math."""
    gen = torch.Generator().manual_seed(1)
    dim, hidden, group = 2048, 256, 64
    q1, q3 = (quantize_tensor(torch.randn(hidden, dim, generator=gen)) for _ in range(2))
    q2 = quantize_tensor(torch.randn(dim, hidden, generator=gen) / 8)
    x = torch.randn(21, dim, generator=gen).bfloat16()
    expected = int4_reference(x, q1, group)
    got = kernels.int4_mm(x, q1.qweight, q1.scales_zeros, group)
    torch.testing.assert_close(
        got.double(), expected, rtol=2**-8, atol=2**-8 * expected.abs().max()
    )
    got = fused_swiglu(kernels, x, q1, q3, q2, group)
    expected = swiglu_reference(x, q1, q3, q2, group)
    torch.testing.assert_close(
        got.double(), expected, rtol=2**-7, atol=2**-7 * expected.abs().max()
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_is_the_models(kernels, monkeypatch, dtype):
    """The kernel's RMSNorm against the model's PyTorch one (the kernels switched off), for one
    row and many: equal but for the order of the float32 sum of squares."""
    from localmix.quant.layers import KernelRMSNorm

    from localmix.model import RMSNorm

    gen = torch.Generator().manual_seed(3)
    norm = RMSNorm(1024, 1e-5)
    norm.weight.data = torch.randn(1024, generator=gen).to(dtype)
    for rows in (1, 37):
        x = (torch.randn(rows, 1024, generator=gen) * 3).to(dtype)
        got = kernels.rms_norm(x, norm.weight, norm.eps)
        assert torch.equal(KernelRMSNorm(norm)(x), got)  # the swapped-in norm takes the kernel
        with monkeypatch.context() as m:
            m.setenv(ENV_SWITCH, "0")
            want = KernelRMSNorm(norm)(x)
        tol = 1e-6 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_bf16_product_is_float_math(kernels):
    """bf16_mm against float64 math, with row counts that are not multiples of 4 and widths
    that are not multiples of 8 or 16; the swapped-in KernelLinear takes it for a few bf16 rows."""
    from localmix.quant.layers import KernelLinear

    gen = torch.Generator().manual_seed(4)
    for n, k in ((8, 1024), (1001, 100), (33, 24), (5, 7)):
        w = torch.randn(n, k, generator=gen).bfloat16()
        for rows in (1, 3):
            x = torch.randn(rows, k, generator=gen).bfloat16()
            want = x.double() @ w.double().t()
            got = kernels.bf16_mm(x, w)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
            torch.testing.assert_close(
                got.double(), want, rtol=2**-8, atol=2**-8 * want.abs().max()
            )
    layer = KernelLinear(100, 1001, bias=False)
    layer.weight.data = w = torch.randn(1001, 100, generator=gen).bfloat16()
    x = torch.randn(2, 100, generator=gen).bfloat16()
    assert torch.equal(layer(x), kernels.bf16_mm(x, w))


def test_kernels_reuse_their_memory_across_shapes(kernels):
    """Working memory kept between calls: a large call then a small one, and the reverse, give
    what fresh calls give."""
    gen = torch.Generator().manual_seed(0)
    big = quantize_tensor(torch.randn(128, 512, generator=gen), group_size=64)
    small = quantize_tensor(torch.randn(64, 128, generator=gen), group_size=64)
    xb = torch.randn(7, 512, generator=gen).bfloat16()
    xs = torch.randn(1, 128, generator=gen).bfloat16()
    first = [kernels.int4_mm(x, q.qweight, q.scales_zeros, 64) for x, q in ((xs, small), (xb, big))]
    again = [kernels.int4_mm(x, q.qweight, q.scales_zeros, 64) for x, q in ((xb, big), (xs, small))]
    assert torch.equal(first[0], again[1]) and torch.equal(first[1], again[0])
    exact = dataclasses.replace(small, dtype=torch.float32).dequantize()
    torch.testing.assert_close(
        kernels.int4_mm(xs.float(), small.qweight, small.scales_zeros, 64),
        xs.float() @ exact.t(),
        rtol=1e-5,
        atol=1e-4,
    )
