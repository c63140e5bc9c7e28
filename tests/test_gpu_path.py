"""The CUDA code paths, checked on the CPU where they can be: traced under PyTorch's
FakeTensorMode on a fake `cuda` device (devices, dtypes, shapes), and on a real GPU under the
`gpu` marker."""

from __future__ import annotations

import localmix.quant.linear as linear_module
import pytest
import torch
from localmix.quant import QuantLinear, quantize_tensor
from localmix.quant.linear import describe_device_kernels, inner_k_tiles, use_device_kernels
from torch._subclasses.fake_tensor import FakeTensorMode


def fake_cuda_layer(out_features: int, in_features: int, bits: int = 4) -> QuantLinear:
    """A QuantLinear whose buffers are fake tensors on `cuda` (call inside FakeTensorMode)."""
    layer = QuantLinear(in_features, out_features, bits=bits, group_size=64)
    layer.qweight = torch.empty(layer.qweight.shape, dtype=layer.qweight.dtype, device="cuda")
    layer.scales_zeros = torch.empty(layer.scales_zeros.shape, dtype=torch.bfloat16, device="cuda")
    return layer


@pytest.mark.parametrize("shape", [(4096, 14336), (14336, 4096), (100, 200)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_int4_path_traces_on_a_fake_gpu(shape, dtype, monkeypatch):
    """sm80+: the weight is repacked on the device by PyTorch's packing function (the shape
    PyTorch's kernel takes, int32 tiles), and products come back in the activation dtype and
    the logical width, for a decode row and a prefill chunk."""
    monkeypatch.setattr(linear_module, "cuda_int4_kernel", lambda device: True)
    out_features, in_features = shape
    with FakeTensorMode():
        layer = fake_cuda_layer(out_features, in_features)
        assert layer.to_kernel_layout() and layer.layout == "tinygemm"
        assert "fused int4" in describe_device_kernels([layer])
        n_p, k_p = layer.padded
        inner = inner_k_tiles(k_p)
        assert layer.qweight.shape == (n_p // 8, k_p // (16 * inner), 32, inner // 2)
        assert layer.qweight.dtype == torch.int32 and layer.qweight.device.type == "cuda"
        assert not layer.to_kernel_layout()  # once
        for rows in (1, 512):
            y = layer(torch.empty(rows, in_features, dtype=dtype, device="cuda"))
            assert y.shape == (rows, out_features) and y.dtype == dtype
            assert y.device.type == "cuda"


def test_older_gpus_and_8_bit_layers_keep_the_stored_layout(monkeypatch):
    """Below sm80 (no fused int4 kernel) and for 8-bit layers the stored layout stays, and each
    product dequantizes on the device in the activation dtype: the same dequantize code the CPU
    tests check (FakeTensorMode cannot run its strided views on a fake CUDA device)."""
    monkeypatch.setattr(linear_module, "cuda_int4_kernel", lambda device: False)
    with FakeTensorMode():
        model = torch.nn.Sequential(fake_cuda_layer(96, 256), fake_cuda_layer(100, 96, bits=8))
        use_device_kernels(model)
        assert "older than sm80" in describe_device_kernels(model.modules())
        assert model[0].layout == "localmix" and model[0].qweight.dtype == torch.uint8
        assert model[1].layout == "localmix" and model[1].qweight.dtype == torch.int8


def test_a_cpu_model_keeps_its_layout():
    w = torch.randn(64, 128)
    q = quantize_tensor(w)
    layer = QuantLinear(128, 64)
    layer.qweight, layer.scales_zeros = q.qweight, q.scales_zeros
    use_device_kernels(torch.nn.Sequential(layer))
    assert not layer.to_kernel_layout() and layer.layout == "localmix"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 14336), (100, 200)])
def test_fused_int4_kernel_matches_dequantized_on_the_gpu(shape):
    out_features, in_features = shape
    w = torch.randn(out_features, in_features).bfloat16()
    q = quantize_tensor(w, method="rtn")
    layer = QuantLinear(in_features, out_features)
    layer.qweight, layer.scales_zeros = q.qweight.cuda(), q.scales_zeros.cuda()
    reference = layer.quantized(torch.float32).dequantize()
    assert layer.to_kernel_layout()
    for rows in (1, 7, 300):
        x = torch.randn(rows, in_features, device="cuda").bfloat16()
        expected = x.float() @ reference.t()
        got = layer(x).float()
        assert (got - expected).abs().max() < 0.02 * expected.abs().max()
