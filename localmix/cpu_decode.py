"""A CPU decode step's attention and routing on localmix's fused kernels, swapped into a model.

A decode step runs one token through every layer. Between the big products, PyTorch would
spend some twenty small ops a layer on RoPE, the cache write, the attention reshapes and SDPA,
and ten more on the router's softmax, top-k and read-back; each op costs its dispatch and
allocation whatever its size. `use_decode_kernels` swaps each layer's `GroupedAttention` for a
`KernelAttention` and each `Router` for a `KernelRouter`: on the CPU, for a one-token step that
sees every cached key, each is one call of localmix's kernels (`attend_one`, `route_one`).
Every other case (prefill chunks, a masked step, a GPU, kernels unavailable) runs the model's
own modules, which the kernels are tested against (tests/test_decode_kernels.py).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor, nn

from .kv_cache import CacheStep
from .model import GroupedAttention, Router, TokenRouting
from .quant.kernels import cpu_kernels
from .quant.layers import replace

KERNEL_DTYPES = (torch.bfloat16, torch.float32)
Rope = tuple[Tensor, Tensor]  # cos and signed sin rows of the step's positions


class KernelAttention(GroupedAttention):
    """GroupedAttention whose one-token CPU steps run `attend_one`: RoPE, the cache write and
    the attention in one call."""

    def __init__(self, attention: GroupedAttention, kernels: ModuleType) -> None:
        a = attention
        super().__init__(a.layer, a.n_heads, a.n_kv, a.head_dim)
        self.attend_one = kernels.attend_one

    def forward(self, q: Tensor, k: Tensor, v: Tensor, step: CacheStep, rope: Rope) -> Tensor:
        single = step.single(self.layer)
        if single is None or q.device.type != "cpu" or q.dtype not in KERNEL_DTYPES:
            return super().forward(q, k, v, step, rope)
        return self.attend_one(q, k, v, *rope, *single)


class ReadRouting(TokenRouting):
    """A token's routing already on the host, as `route_one` gives it."""

    def __init__(self, read: list[float], top_k: int) -> None:
        self.ids = [int(e) for e in read[:top_k]]
        super().__init__(torch.empty(0), torch.tensor([self.ids]))
        self.weights_read = read[top_k:]

    def read(self, ahead: torch.Tensor | None) -> tuple[list[int], list[float], list[int]]:
        predicted = [] if ahead is None else [int(e) for e in ahead.tolist()]
        return self.ids, self.weights_read, predicted


class KernelRouter(Router):
    """Router whose one-token CPU routing runs `route_one`: the softmax, top-k and renormalised
    weights of a decode step computed as Python numbers, without tensor ops."""

    def __init__(self, router: Router, kernels: ModuleType) -> None:
        super().__init__(router.top_k)
        self.route_one = kernels.route_one

    def one(self, logits: torch.Tensor) -> TokenRouting:
        if logits.device.type != "cpu" or logits.dtype not in KERNEL_DTYPES:
            return super().one(logits)
        return ReadRouting(self.route_one(logits, self.top_k), self.top_k)


def use_decode_kernels(model: nn.Module) -> None:
    """Swap `model`'s attention cores and routers for the kernel ones, where localmix's CPU
    kernels are built and run here (they leave any other step to the model's own code)."""
    kernels = cpu_kernels()
    if kernels is None:
        return
    for name, module in list(model.named_modules()):
        if type(module) is GroupedAttention and module.head_dim % 8 == 0:
            replace(model, name, KernelAttention(module, kernels))
        elif type(module) is Router:
            replace(model, name, KernelRouter(module, kernels))
