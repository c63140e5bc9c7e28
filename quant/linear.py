"""QuantLinear: a drop-in for nn.Linear whose weight is stored 4-bit grouped or 8-bit per channel."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .choice import Kernel, KernelChoice
from .formats import QuantizedTensor, padded_shape, unpack_int4
from .kernels import cpu_kernels
from .layers import replace, swap_plain_modules

# (padded activations, layer) -> (rows, out_p): one product on a format's CPU kernel
Product = Callable[[torch.Tensor, "QuantLinear"], torch.Tensor]


class Format:
    """What differs between the stored formats: buffer shapes and the kernels that read them.

    One instance per format (`FORMATS`), chosen when a QuantLinear is built; the layer asks it
    instead of testing its bits.
    """

    bits: int
    pytorch_max_rows: int  # rows up to which PyTorch's CPU kernel beats one dequantized product
    fused_cuda = False  # whether PyTorch's fused int4 CUDA kernel takes this format

    def buffers(
        self, padded: tuple[int, int], group_size: int
    ) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...]]:
        """(qweight shape, qweight dtype, scales_zeros shape) for a weight padded to `padded`."""
        raise NotImplementedError

    def group(self, group_size: int) -> int:
        """The group size QuantizedTensor records (0 where the format has no groups)."""
        return 0

    def own_kernel(self, kernels: ModuleType) -> Product:
        """The product on localmix's CPU kernels (`kernels`, the compiled module)."""
        raise NotImplementedError

    def pytorch_weight(self, qweight: torch.Tensor) -> torch.Tensor:
        """The stored codes in the layout PyTorch's CPU kernel takes on this machine."""
        raise NotImplementedError

    def pytorch_product(
        self, x: torch.Tensor, weight: torch.Tensor, params: torch.Tensor, group_size: int
    ) -> torch.Tensor:
        """The product on PyTorch's CPU kernel, over `pytorch_weight`'s layout."""
        raise NotImplementedError


class Int4Grouped(Format):
    """4-bit codes, two a byte, with a bf16 scale and zero per group of input columns."""

    bits, pytorch_max_rows, fused_cuda = 4, 128, True

    def buffers(
        self, padded: tuple[int, int], group_size: int
    ) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...]]:
        n_p, k_p = padded
        return (n_p, k_p // 2), torch.uint8, (k_p // group_size, n_p, 2)

    def group(self, group_size: int) -> int:
        return group_size

    def own_kernel(self, kernels: ModuleType) -> Product:
        mm = kernels.int4_mm
        return lambda x, layer: mm(x, layer.qweight, layer.scales_zeros, layer.group_size)

    def pytorch_weight(self, qweight: torch.Tensor) -> torch.Tensor:
        codes = unpack_int4(qweight).to(torch.int32)  # (out_p, in_p)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)

    def pytorch_product(
        self, x: torch.Tensor, weight: torch.Tensor, params: torch.Tensor, group_size: int
    ) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group_size, params)


class Int8PerRow(Format):
    """8-bit codes with one bf16 scale per output row."""

    bits, pytorch_max_rows = 8, 16

    def buffers(
        self, padded: tuple[int, int], group_size: int
    ) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...]]:
        n_p, k_p = padded
        return (n_p, k_p), torch.int8, (n_p,)

    def own_kernel(self, kernels: ModuleType) -> Product:
        mm = kernels.int8_mm
        return lambda x, layer: mm(x, layer.qweight, layer.scales_zeros)

    def pytorch_weight(self, qweight: torch.Tensor) -> torch.Tensor:
        return qweight

    def pytorch_product(
        self, x: torch.Tensor, weight: torch.Tensor, params: torch.Tensor, group_size: int
    ) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, weight, params)


FORMATS: dict[int, Format] = {4: Int4Grouped(), 8: Int8PerRow()}


CACHE_LINE = 64  # bytes


class QuantLinear(KernelChoice):
    """A linear layer over a quantized weight; swapped in for nn.Linear by the loader.

    Buffers `qweight` and `scales_zeros` hold the weight in localmix's stored layout, padded to
    `padded_shape` (see `quant.formats`). Which kernel runs is chosen for where the buffers sit
    (`KernelChoice`), not on every call. On the CPU, localmix's own kernels run straight on the
    stored layout (`quant.kernels`) for any number of activation rows: prefill included, since
    they share each unpacked weight column between two rows and keep a chunk of rows in cache,
    their time per row stays flat, and they beat dequantizing the weight and one float32 matmul
    at every row count measured (benchmarks/bench_quant.py). Without them, up to the format's
    `pytorch_max_rows` rows run PyTorch's int4/int8 kernels on a copy that PyTorch's own packing
    function made on this machine (its layout differs between CPUs), kept until the weight
    changes; more rows dequantize once and run one float32 matmul. On a GPU, 4-bit weights
    repacked by `to_kernel_layout` run PyTorch's fused kernel; others dequantize per product.
    """

    layout = "localmix"  # or "tinygemm" once repacked for PyTorch's CUDA kernel

    def __init__(
        self, in_features: int, out_features: int, bits: int = 4, group_size: int = 64
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.format = FORMATS[bits]
        self.padded = padded_shape(out_features, in_features, bits, group_size)
        qshape, qdtype, sshape = self.format.buffers(self.padded, group_size)
        self.qweight: torch.Tensor
        self.scales_zeros: torch.Tensor
        self.register_buffer("qweight", torch.empty(qshape, dtype=qdtype))
        self.register_buffer("scales_zeros", torch.empty(sshape, dtype=torch.bfloat16))
        self._pytorch_packed: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        group = self.format.group(self.group_size)
        g = f", group_size={group}" if group else ""
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
            self.format.group(self.group_size),
            "stored",
        )

    def choose(self) -> Kernel:
        if self.layout == "tinygemm":
            return QuantLinear._fused_cuda
        if self.qweight.device.type != "cpu":  # a GPU without the fused kernel, or 8 bits
            return QuantLinear._dequantized
        kernels = cpu_kernels()
        if kernels is None:
            return QuantLinear._pytorch_cpu
        self._own_kernel = self.format.own_kernel(kernels)
        return QuantLinear._own_cpu

    def _fused_cuda(self, x: torch.Tensor) -> torch.Tensor:
        """PyTorch's fused int4 CUDA kernel: (rows, in_p) bf16 -> (rows, out_p)."""
        y = torch.ops.aten._weight_int4pack_mm(
            self._pad(x).to(torch.bfloat16), self.qweight, self.group_size, self.scales_zeros
        )
        return self._logical(y.to(x.dtype))

    def _own_cpu(self, x: torch.Tensor) -> torch.Tensor:
        return self._logical(self._own_kernel(self._pad(x), self))

    def _pytorch_cpu(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.format.pytorch_max_rows:
            return self._dequantized(x)
        weight, params = self._pytorch_layout(x.dtype)
        y = self.format.pytorch_product(self._pad(x), weight, params, self.group_size)
        return self._logical(y)

    def _dequantized(self, x: torch.Tensor) -> torch.Tensor:
        """One product with the dequantized weight: float32 on the CPU, x's dtype elsewhere."""
        compute = torch.float32 if x.device.type == "cpu" else x.dtype
        w = self.quantized(compute).dequantize()
        return F.linear(x.to(compute), w).to(x.dtype)

    def _logical(self, y: torch.Tensor) -> torch.Tensor:
        """y (rows, out_p) without the padding rows of the weight."""
        return y if y.shape[-1] == self.out_features else y.narrow(1, 0, self.out_features)

    def to_kernel_layout(self) -> bool:
        """Repack a 4-bit weight that sits on a CUDA device with PyTorch's fused int4 kernel
        (sm80 and newer) into that kernel's layout, on the device, with PyTorch's own packing
        function. Returns whether it did; elsewhere the stored layout stays."""
        if not (
            self.format.fused_cuda
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
        self.rechoose()
        return True

    def align_to_cache_lines(self) -> bool:
        """Move buffers on the CPU that do not start on a cache line to memory that does.
        Returns whether any moved.

        A safetensors file maps each tensor at whatever offset its header and the tensors
        before it leave; the kernels' 32-byte loads from such a weight straddle two cache
        lines every other time, which slows a memory-bound product by as much as half.
        """
        moved = False
        for name in ("qweight", "scales_zeros"):
            t = getattr(self, name)
            if t.device.type == "cpu" and t.data_ptr() % CACHE_LINE:
                setattr(self, name, t.clone())  # PyTorch's CPU allocator aligns to 64 bytes
                moved = True
        return moved

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """x with zero columns up to the stored width (a no-op for most shapes)."""
        extra = self.padded[1] - self.in_features
        return F.pad(x, (0, extra)) if extra else x

    def _pytorch_layout(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight as PyTorch's CPU kernels take it, packed by PyTorch on this machine, and
        the scales in the activation dtype. Made on first use and again whenever the buffers
        change (an expert cache slot refilled in place bumps their version counter)."""
        key = (
            self.qweight.data_ptr(),
            self.qweight._version,
            self.scales_zeros._version,
            dtype,
        )
        if self._pytorch_packed is None or self._pytorch_packed[0] != key:
            weight = self.format.pytorch_weight(self.qweight)
            self._pytorch_packed = (key, weight, self.scales_zeros.to(dtype))
        return self._pytorch_packed[1], self._pytorch_packed[2]


class QuantExpert(KernelChoice):
    """A SwiGLU expert, w2(silu(w1 x) * w3 x), over three 4-bit QuantLinear that chain (the
    hidden width padded alike as w1's and w3's rows and w2's columns, one group size).

    On the CPU with localmix's kernels it runs the whole expert in one call (`int4_swiglu`): a
    decode step runs each expert on one row, and one call saves the dispatches between the
    three products and the gating. Elsewhere it runs the three products.
    """

    def __init__(self, w1: QuantLinear, w2: QuantLinear, w3: QuantLinear) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3

    @staticmethod
    def fits(w1: nn.Module, w2: nn.Module, w3: nn.Module) -> bool:
        """Whether the fused kernel takes these three matrices."""
        return (
            isinstance(w1, QuantLinear)
            and isinstance(w2, QuantLinear)
            and isinstance(w3, QuantLinear)
            and w1.bits == w2.bits == w3.bits == 4
            and w1.group_size == w2.group_size == w3.group_size
            and w1.padded == w3.padded
            and w2.padded[1] == w1.padded[0]
        )

    def choose(self) -> Kernel:
        on_cpu = self.w1.qweight.device.type == "cpu" and self.w1.layout == "localmix"
        kernels = cpu_kernels() if on_cpu else None
        if kernels is None:
            return QuantExpert.separate
        self._swiglu = kernels.int4_swiglu
        return QuantExpert.fused

    def separate(self, x: torch.Tensor) -> torch.Tensor:
        """The three products."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """The whole expert in one call of localmix's `int4_swiglu` (on the CPU, once chosen)."""
        w1, w2, w3 = self.w1, self.w2, self.w3
        y = self._swiglu(
            w1._pad(x),
            w1.qweight,
            w1.scales_zeros,
            w3.qweight,
            w3.scales_zeros,
            w2.qweight,
            w2.scales_zeros,
            w1.group_size,
        )
        return w2._logical(y)


def cuda_int4_kernel(device: torch.device) -> bool:
    """Whether PyTorch's fused int4 CUDA kernel (`_weight_int4pack_mm`, bf16) runs on `device`."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def inner_k_tiles(in_padded: int) -> int:
    """The widest tiling of the input dimension PyTorch's CUDA int4 packing takes for it."""
    return next(t for t in (8, 4, 2) if in_padded % (16 * t) == 0)


def use_device_kernels(model: nn.Module) -> None:
    """Make `model` (loaded) run on the kernels of the machine it sits on: its 16-bit linear
    layers and norms swapped for the kernel modules (`quant.layers`), every 4-bit layer on a
    CUDA device with PyTorch's fused int4 kernel repacked for it, and the quantized weights on
    the CPU on cache lines."""
    swap_plain_modules(model)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.to_kernel_layout()
            m.align_to_cache_lines()


def describe_device_kernels(modules: Iterable[nn.Module]) -> str:
    """One line for reports: which kernels the quantized layers among `modules` use on a GPU."""
    layers = [m for m in modules if isinstance(m, QuantLinear)]
    if not layers:
        return ""
    if any(m.layout == "tinygemm" for m in layers):
        return "PyTorch's fused int4 CUDA kernel (sm80+); 8-bit layers dequantized per product"
    return "a dequantized product per call (no fused int4 kernel: a GPU older than sm80)"


def swap_linears(model: nn.Module, choose: Callable[[str], int], group_size: int) -> list[str]:
    """Replace each nn.Linear whose name `choose` maps to 4 or 8 bits by a QuantLinear, then each
    expert (children `w1`, `w2`, `w3`) whose three matrices `QuantExpert.fits` by a QuantExpert.

    Works on a model built on the meta device (nothing is allocated). Returns the names of the
    linear layers swapped.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        bits = choose(name)
        if not bits:
            continue
        with torch.device("meta"):
            replace(
                model, name, QuantLinear(module.in_features, module.out_features, bits, group_size)
            )
        swapped.append(name)
    for name, module in list(model.named_modules()):
        children = dict(module.named_children())
        if name and set(children) == {"w1", "w2", "w3"} and QuantExpert.fits(**children):
            replace(model, name, QuantExpert(**children))
    return swapped
