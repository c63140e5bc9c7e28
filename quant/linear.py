"""QuantLinear: a drop-in for nn.Linear whose weight is stored 4-bit grouped or 8-bit per channel."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .formats import QuantizedTensor, padded_shape, unpack_int4
from .kernels import cpu_kernels


class QuantLinear(nn.Module):
    """A linear layer over a quantized weight; swapped in for nn.Linear by the loader.

    Buffers `qweight` and `scales_zeros` hold the weight in localmix's stored layout, padded to
    `padded_shape` (see `quant.formats`). On the CPU, localmix's own kernels run straight on the
    stored layout (`quant.kernels`) for any number of activation rows: prefill included, since
    they share each unpacked weight column between two rows and keep a chunk of rows in cache,
    their time per row stays flat, and on a 2-core AVX2 machine they beat dequantizing the weight
    and one float32 matmul at every row count measured (2 to 512). Without them, up to
    KERNEL_MAX_ROWS[bits] rows run PyTorch's int4/int8 kernels on a copy that PyTorch's own
    packing function made on this machine (its layout differs between CPUs), kept until the
    weight changes; more rows dequantize once and run one float32 matmul.
    """

    KERNEL_MAX_ROWS = {4: 128, 8: 16}  # PyTorch's kernels
    layout = "localmix"  # or "tinygemm" once repacked for PyTorch's CUDA kernel

    def __init__(
        self, in_features: int, out_features: int, bits: int = 4, group_size: int = 64
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.padded = padded_shape(out_features, in_features, bits, group_size)
        n_p, k_p = self.padded
        sshape: tuple[int, ...]
        if bits == 4:
            qshape, qdtype, sshape = (n_p, k_p // 2), torch.uint8, (k_p // group_size, n_p, 2)
        else:
            qshape, qdtype, sshape = (n_p, k_p), torch.int8, (n_p,)
        self.qweight: torch.Tensor
        self.scales_zeros: torch.Tensor
        self.register_buffer("qweight", torch.empty(qshape, dtype=qdtype))
        self.register_buffer("scales_zeros", torch.empty(sshape, dtype=torch.bfloat16))
        self._torch_packed: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}{g}"

    def quantized(self, dtype: torch.dtype = torch.bfloat16) -> QuantizedTensor:
        """The stored weight as a QuantizedTensor (not once repacked for a CUDA kernel)."""
        if self.layout != "localmix":
            raise ValueError(
                f"the weight is in the {self.layout} layout, which only its kernel reads"
            )
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
        if self.layout == "tinygemm":  # (rows, in_p) bf16 -> (rows, out_p)
            y = torch.ops.aten._weight_int4pack_mm(
                self._pad(x).to(torch.bfloat16), self.qweight, self.group_size, self.scales_zeros
            ).to(x.dtype)
        elif x.device.type == "cpu" and (
            cpu_kernels() is not None or x.shape[0] <= self.KERNEL_MAX_ROWS[self.bits]
        ):
            y = self._cpu_product(self._pad(x))
        else:  # many rows on the CPU, or a GPU without the fused kernel: one dequantized product
            compute = torch.float32 if x.device.type == "cpu" else x.dtype
            w = self.quantized(compute).dequantize()
            return F.linear(x.to(compute), w).to(x.dtype)
        return y if y.shape[-1] == self.out_features else y.narrow(1, 0, self.out_features)

    def to_kernel_layout(self) -> bool:
        """Repack a 4-bit weight that sits on a CUDA device with PyTorch's fused int4 kernel
        (sm80 and newer) into that kernel's layout, on the device, with PyTorch's own packing
        function. Returns whether it did; elsewhere the stored layout stays."""
        if not (
            self.bits == 4
            and self.layout == "localmix"
            and self.qweight.device.type == "cuda"
            and cuda_int4_kernel(self.qweight.device)
        ):
            return False
        n_p, k_p = self.padded
        codes = unpack_int4(self.qweight).view(n_p, k_p // 2, 2)  # column pairs
        # (out_p, in_p / 2): each even column's code in the high nibble, the odd one's low
        nibbles = torch.tensor([16, 1], dtype=torch.uint8, device=codes.device)
        pairs = (codes * nibbles).sum(-1, dtype=torch.uint8)
        inner = inner_k_tiles(k_p)
        self.qweight = torch.ops.aten._convert_weight_to_int4pack(pairs, inner)
        self.scales_zeros = self.scales_zeros.contiguous()
        self.layout = "tinygemm"
        return True

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """x with zero columns up to the stored width (a no-op for most shapes)."""
        extra = self.padded[1] - self.in_features
        return F.pad(x, (0, extra)) if extra else x

    def _cpu_product(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, in_p) times the padded weight: (rows, out_p) in x's dtype."""
        kernels = cpu_kernels()
        if kernels is not None:
            if self.bits == 4:
                return kernels.int4_mm(x, self.qweight, self.scales_zeros, self.group_size)
            return kernels.int8_mm(x, self.qweight, self.scales_zeros)
        weight, params = self._torch_layout(x.dtype)
        if self.bits == 4:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, self.group_size, params)
        return torch.ops.aten._weight_int8pack_mm(x, weight, params)

    def _torch_layout(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight as PyTorch's CPU kernels take it, packed by PyTorch on this machine, and
        the scales in the activation dtype. Made on first use and again whenever the buffers
        change (an expert cache slot refilled in place bumps their version counter)."""
        key = (
            self.qweight.data_ptr(),
            self.qweight._version,
            self.scales_zeros._version,
            dtype,
        )
        if self._torch_packed is None or self._torch_packed[0] != key:
            if self.bits == 4:
                codes = unpack_int4(self.qweight).to(torch.int32)  # (out_p, in_p)
                weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            else:
                weight = self.qweight
            self._torch_packed = (key, weight, self.scales_zeros.to(dtype))
        return self._torch_packed[1], self._torch_packed[2]

    def swiglu(self, up: nn.Module, down: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """down(silu(self(x)) * up(x)) in one kernel call, or None where that does not apply.

        A decode step runs each expert on one row; doing the three products and the gating in
        one call saves the dispatches between them. Applies to 4-bit layers on the CPU with
        localmix's kernels, for any number of rows, where the padded shapes chain (the hidden
        width padded alike as w1's rows and w2's columns).
        """
        if not (
            isinstance(up, QuantLinear)
            and isinstance(down, QuantLinear)
            and self.bits == up.bits == down.bits == 4
            and self.group_size == up.group_size == down.group_size
            and self.padded == up.padded
            and down.padded[1] == self.padded[0]
            and x.device.type == "cpu"
        ):
            return None
        kernels = cpu_kernels()
        if kernels is None:
            return None
        y = kernels.int4_swiglu(
            self._pad(x),
            self.qweight,
            self.scales_zeros,
            up.qweight,
            up.scales_zeros,
            down.qweight,
            down.scales_zeros,
            self.group_size,
        )
        return y if y.shape[-1] == down.out_features else y.narrow(1, 0, down.out_features)


def cuda_int4_kernel(device: torch.device) -> bool:
    """Whether PyTorch's fused int4 CUDA kernel (`_weight_int4pack_mm`, bf16) runs on `device`."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def inner_k_tiles(in_padded: int) -> int:
    """The widest tiling of the input dimension PyTorch's CUDA int4 packing takes for it."""
    return next(t for t in (8, 4, 2) if in_padded % (16 * t) == 0)


def use_device_kernels(model: nn.Module) -> None:
    """Repack every quantized layer of `model` that sits on a CUDA device for the fused kernel,
    where that kernel runs there."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.to_kernel_layout()


def describe_device_kernels(modules: Iterable[nn.Module]) -> str:
    """One line for reports: which kernels the quantized layers among `modules` use on a GPU."""
    layers = [m for m in modules if isinstance(m, QuantLinear)]
    if not layers:
        return ""
    if any(m.layout == "tinygemm" for m in layers):
        return "PyTorch's fused int4 CUDA kernel (sm80+); 8-bit layers dequantized per product"
    return "a dequantized product per call (no fused int4 kernel: a GPU older than sm80)"


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
