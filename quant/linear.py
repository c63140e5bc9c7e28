"""QuantLinear: a drop-in for nn.Linear whose weight is stored 4-bit grouped or 8-bit per channel."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .formats import QuantizedTensor
from .kernels import cpu_kernels


class QuantLinear(nn.Module):
    """A linear layer over a quantized weight; swapped in for nn.Linear by the loader.

    Buffers `qweight` and `scales_zeros` hold the packed weight (see `quant.formats`). Up to
    KERNEL_MAX_ROWS[bits] activation rows run a matrix-vector kernel straight on the packed
    weight: localmix's own AVX2 kernels on the CPU (`quant.kernels`), else PyTorch's int4/int8
    kernels where they take the activation dtype (bf16 on the CPU). Their cost grows with the
    rows, so a longer prefill chunk dequantizes once and runs one float32 matmul instead. On a
    2-core AVX2 machine that wins from about 150 rows on in 4 bits, and from about 20 in 8 bits,
    whose dequantization is a single multiply.
    """

    KERNEL_MAX_ROWS = {4: 128, 8: 16}

    def __init__(
        self, in_features: int, out_features: int, bits: int = 4, group_size: int = 64
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        if bits == 4:
            qshape, qdtype = (out_features, in_features // 2), torch.uint8
            sshape = (in_features // group_size, out_features, 2)
        else:
            qshape, qdtype, sshape = (out_features, in_features), torch.int8, (out_features,)
        self.register_buffer("qweight", torch.empty(qshape, dtype=qdtype))
        self.register_buffer("scales_zeros", torch.empty(sshape, dtype=torch.bfloat16))

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}{g}"

    def quantized(self, dtype: torch.dtype = torch.bfloat16) -> QuantizedTensor:
        return QuantizedTensor(
            self.qweight,
            self.scales_zeros,
            (self.out_features, self.in_features),
            dtype,
            self.bits,
            self.group_size if self.bits == 4 else 0,
            "stored",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.shape[0] <= self.KERNEL_MAX_ROWS[self.bits]:
            kernels = cpu_kernels()
            if kernels is not None:
                if self.bits == 4:
                    return kernels.int4_mm(x, self.qweight, self.scales_zeros, self.group_size)
                return kernels.int8_mm(x, self.qweight, self.scales_zeros)
            if x.dtype == torch.bfloat16:
                if self.bits == 4:
                    return torch.ops.aten._weight_int4pack_mm_for_cpu(
                        x, self.qweight, self.group_size, self.scales_zeros
                    )
                return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales_zeros)
        w = self.quantized(torch.float32).dequantize()
        return F.linear(x.float(), w).to(x.dtype)

    def swiglu(self, up: nn.Module, down: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """down(silu(self(x)) * up(x)) in one kernel call, or None where that does not apply.

        A decode step runs each expert on one row; doing the three products and the gating in
        one call saves the dispatches between them. Applies to 4-bit layers on the CPU with
        localmix's kernels, for as many rows as the single-layer kernels take.
        """
        if not (
            isinstance(up, QuantLinear)
            and isinstance(down, QuantLinear)
            and self.bits == up.bits == down.bits == 4
            and self.group_size == up.group_size == down.group_size
            and x.device.type == "cpu"
            and x.shape[0] <= self.KERNEL_MAX_ROWS[4]
        ):
            return None
        kernels = cpu_kernels()
        if kernels is None:
            return None
        return kernels.int4_swiglu(
            x,
            self.qweight,
            self.scales_zeros,
            up.qweight,
            up.scales_zeros,
            down.qweight,
            down.scales_zeros,
            self.group_size,
        )


def swap_linears(model: nn.Module, choose: Callable[[str], int], group_size: int) -> list[str]:
    """Replace each nn.Linear whose name `choose` maps to 4 or 8 bits by a QuantLinear.

    Works on a model built on the meta device (nothing is allocated). Returns the names swapped.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        bits = choose(name)
        if not bits:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device("meta"):
            q = QuantLinear(module.in_features, module.out_features, bits, group_size)
        setattr(parent, child, q)
        swapped.append(name)
    return swapped
