"""16-bit layers on the kernels of the machine that runs them, swapped into a loaded model.

The model builds plain modules; `swap_plain_modules` replaces, once the weights are loaded, each
`nn.Linear` left 16-bit by a `KernelLinear` and each RMS norm by a `KernelRMSNorm`, sharing their
tensors (nothing is copied). The quantized layers are swapped in before loading
(`quant.linear.swap_linears`). Each swapped module chooses its kernel for where its tensors sit
(`KernelChoice`), so the model runs right after it moves between the CPU and a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .choice import Kernel, KernelChoice
from .kernels import cpu_kernels


class KernelLinear(KernelChoice, nn.Linear):
    """nn.Linear (without bias) that runs 16-bit matmuls on the CPU on the fastest path there.

    CPUs without native bf16/fp16 arithmetic (AVX2) multiply 16-bit matrices several times
    slower than float32 ones: from `UPCAST_ROWS` rows on (prefill), upcasting the weight once
    costs less than it saves. Fewer rows of a bf16 weight (decode) run localmix's kernel
    (`bf16_mm`, float32 sums) where it is built; PyTorch's own wakes a second thread even for
    a weight as small as the router's. float32 weights, and every weight off the CPU, run
    nn.Linear's product. Activations are (rows, features) in the weight's dtype.
    """

    UPCAST_ROWS = 16

    def choose(self) -> Kernel:
        w = self.weight
        if w.device.type != "cpu" or w.dtype == torch.float32:
            return KernelLinear._plain
        kernels = cpu_kernels() if w.dtype == torch.bfloat16 else None
        if kernels is None:
            return KernelLinear._upcast
        self._bf16_mm = kernels.bf16_mm
        return KernelLinear._bf16

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def _upcast(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < self.UPCAST_ROWS:
            return F.linear(x, self.weight)
        return F.linear(x.float(), self.weight.float()).to(x.dtype)

    def _bf16(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < self.UPCAST_ROWS:
            return self._bf16_mm(x, self.weight)
        return self._upcast(x)


class KernelRMSNorm(KernelChoice):
    """An RMS norm (a `weight` and an `eps`) that runs localmix's `rms_norm` kernel on the CPU
    for bf16 and float32 weights (one call instead of eight PyTorch ops; a decode step runs two
    norms a layer), and elsewhere the forward of the norm module it replaced.

    Activations are contiguous (rows, dim) in the weight's dtype, as the model's are.
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps
        # the replaced module's forward, which reads only `weight` and `eps`
        self.reference: Kernel = type(norm).forward

    def choose(self) -> Kernel:
        w = self.weight
        kernels = None
        if w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float32):
            kernels = cpu_kernels()
        if kernels is None:
            return self.reference
        self._rms_norm = kernels.rms_norm
        return KernelRMSNorm._kernel

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return self._rms_norm(x, self.weight, self.eps)


def swap_plain_modules(model: nn.Module) -> None:
    """Replace each bias-free `nn.Linear` of `model` by a KernelLinear and each RMS norm (a
    module holding just a `weight` vector and an `eps`) by a KernelRMSNorm, over the same
    tensors. Modules already swapped stay."""
    for name, module in list(model.named_modules()):
        if not name:  # the model itself stays
            continue
        if type(module) is nn.Linear and module.bias is None:
            with torch.device("meta"):
                linear = KernelLinear(module.in_features, module.out_features, bias=False)
            linear.weight = module.weight
            replace(model, name, linear)
        elif is_rms_norm(module):
            replace(model, name, KernelRMSNorm(module))


def is_rms_norm(module: nn.Module) -> bool:
    """Whether `module` looks like an RMS norm: a `weight` vector and an `eps`, nothing else."""
    params = dict(module.named_parameters(recurse=False))
    eps = getattr(module, "eps", None)
    return (
        not isinstance(module, KernelChoice)
        and set(params) == {"weight"}
        and params["weight"].dim() == 1
        and isinstance(eps, (int, float))
        and not isinstance(eps, bool)
        and next(module.children(), None) is None
        and next(module.buffers(recurse=False), None) is None
    )


def replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where `model`'s submodule `name` is (not `model` itself)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
