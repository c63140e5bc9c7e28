"""A CPU decode step's layers on localmix's fused kernels, swapped in.

A decode step runs one token through every layer. Between the big products, PyTorch would
spend some twenty small ops a layer on RoPE, the cache write, the attention reshapes and SDPA,
ten more on the router's softmax, top-k and read-back, and five on weighting and adding the
experts' outputs; each op costs its dispatch and allocation whatever its size, and each module
call its Python. `use_decode_kernels` swaps each layer's `GroupedAttention` for a
`KernelAttention`, each `Router` for a `KernelRouter`, resident 4-bit experts for
`KernelExperts`, and an `Attention` with 8-bit q, k and v for `KernelProjections`: on the CPU,
for a one-token step (that sees every cached key), each is one call of localmix's kernels
(`attend_one`, `route_one`, `int4_moe`, `int8_mm_many`). Each `Block` becomes a `KernelBlock`,
which runs those same kernels for the whole layer in one call (`DecodeBlock`), with the same
bits. Every other case (prefill chunks, a masked step, a GPU, an expert cache, kernels
unavailable) runs the model's own modules, which the kernels are tested against
(tests/test_decode_kernels.py)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from .kv_cache import CacheStep
from .model import (
    Attention,
    Block,
    GroupedAttention,
    MoeLayer,
    ResidentExperts,
    Router,
    TokenRouting,
)
from .quant.choice import MadeFromTensors
from .quant.kernels import cpu_kernels
from .quant.layers import KernelLinear, KernelRMSNorm, replace
from .quant.linear import QuantExpert, QuantLinear

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

    def __init__(self, read: list[float], top_k: int) -> None:  # no TokenRouting.__init__:
        self.ids = [int(e) for e in read[:top_k]]  # the weights are numbers already
        self.chosen = torch.tensor([self.ids])  # (1, k), for observers
        self.weights_read = read[top_k:]

    def read(self, ahead: torch.Tensor | None) -> tuple[list[int], list[float], list[int]]:
        predicted = [] if ahead is None else [int(e) for e in ahead.tolist()]
        return self.ids, self.weights_read, predicted


class KernelProjections(Attention):
    """Attention whose one-token CPU projections of 8-bit q, k and v run as one product
    (`int8_mm_many`): the activation rounded once, one parallel region for the three."""

    def __init__(self, attention: Attention, kernels: ModuleType) -> None:
        adopt_children(self, attention)
        self.int8_mm_many = kernels.int8_mm_many

    @staticmethod
    def fits(attention: Attention) -> bool:
        """Whether int8_mm_many takes q, k and v: unpadded 8-bit layers of one width."""
        layers = (attention.q_proj, attention.k_proj, attention.v_proj)
        return all(
            isinstance(w, QuantLinear)
            and w.bits == 8
            and not padded(w)
            and w.in_features == attention.q_proj.in_features
            and w.in_features % 32 == 0
            and w.out_features % 4 == 0
            for w in layers
        )

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.q_proj, self.k_proj, self.v_proj
        assert isinstance(q, QuantLinear) and isinstance(k, QuantLinear)
        assert isinstance(v, QuantLinear)
        on_cpu = x.device.type == "cpu" and q.qweight.device.type == "cpu"
        if not on_cpu or x.shape[0] != 1 or x.dtype == torch.float32:
            return super().project(x)
        weights, scales = [q.qweight, k.qweight, v.qweight], [w.scales_zeros for w in (q, k, v)]
        qkv = self.int8_mm_many(x, weights, scales)  # (1, q + k + v)
        nq, nk = q.out_features, k.out_features
        return qkv[:, :nq], qkv[:, nq : nq + nk], qkv[:, nq + nk :]


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


class KernelExperts(ResidentExperts, MadeFromTensors):
    """Resident 4-bit experts whose decode step runs `int4_moe`: the routed experts computed and
    combined in one call, in the model's order and rounding."""

    listed: list[list[Tensor]] | None = None  # `tensors`, until they move

    def __init__(self, experts: list[QuantExpert], kernels: ModuleType) -> None:
        super().__init__(experts)
        self.int4_moe = kernels.int4_moe
        self.group_size = experts[0].w1.group_size

    @property
    def tensors(self) -> list[list[Tensor]]:
        """Each expert's (q1, s1, q3, s3, q2, s2), as int4_moe takes them."""
        if self.listed is None:
            self.listed = [
                [t for w in (e.w1, e.w3, e.w2) for t in (w.qweight, w.scales_zeros)]
                for e in self
                if isinstance(e, QuantExpert)
            ]
        return self.listed

    def forget(self) -> None:
        self.listed = None  # listed again from the moved, loaded or copied tensors

    @staticmethod
    def fitting(experts: ResidentExperts) -> list[QuantExpert] | None:
        """The experts, where int4_moe takes them: QuantExperts of one unpadded 4-bit shape."""
        fit = [
            e for e in experts if isinstance(e, QuantExpert) and not (padded(e.w1) or padded(e.w2))
        ]
        if not fit or len(fit) < len(experts):
            return None
        shape = {(e.w1.padded, e.w2.padded, e.w1.group_size) for e in fit}
        return fit if len(shape) == 1 else None

    def combine(self, x: Tensor, weight: dict[int, float]) -> Tensor | None:
        qweight = self.tensors[0][0]
        on_cpu = qweight.device.type == "cpu" and x.device.type == "cpu"
        if not on_cpu or x.dtype not in KERNEL_DTYPES or qweight.dtype != torch.uint8:
            return None
        ids = sorted(weight)
        tensors = [self.tensors[e] for e in ids]
        return self.int4_moe(x, tensors, [weight[e] for e in ids], self.group_size)


class KernelBlock(Block, MadeFromTensors):
    """Block whose one-token CPU steps in bfloat16 (that see every cached key) run as one call of
    the kernels' `DecodeBlock`: the layer's norms, products, attention, routing and experts as
    its kernel modules run them one by one, with the same bits, without a Python call between.

    The plan (`DecodeBlock`) holds the layer's tensors; it is made at the first such step and
    made again when a submodule was replaced or after the block (or the model) moved, loaded or
    was copied; tensors replaced inside a submodule by other means are not seen. A layer it
    does not take (16-bit experts, padded weights, an expert cache) runs Block's forward. The
    routing observer hears of a layer's experts after the layer ran, not before its experts
    (no plan serves an expert cache, which would act on it).
    """

    decode_plan: Any = None  # a DecodeBlock, or None where the kernels do not take the layer
    planned_for: tuple[object, ...] | None = None  # the modules decode_plan was made for

    def __init__(self, block: Block, kernels: ModuleType) -> None:
        adopt_children(self, block)
        self.layer = self.self_attn.attend.layer
        self.decode_block = kernels.DecodeBlock  # a class: copied by reference, as functions
        self.forget()

    def forward(self, x: Tensor, step: CacheStep, rope: Rope) -> Tensor:
        if x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            single = step.single(self.layer)
            if single is not None and (plan := self.plan()) is not None:
                out, chosen = plan.step(x, *rope, *single)
                moe = self._modules["block_sparse_moe"]
                assert isinstance(moe, MoeLayer)  # a plan is made only for a MoE layer
                if moe.observer is not None:
                    moe.observer(moe.layer, chosen)
                return out
        return super().forward(x, step, rope)

    def parts(self) -> tuple[object, ...]:
        """The modules the plan runs, in `block_plan`'s order. Read from `_modules` (a step
        asks for them in every layer; nn.Module's attribute lookup would cost some 80 us a
        token)."""
        m = self._modules
        moe = m.get("block_sparse_moe")
        if not isinstance(moe, MoeLayer):
            return ()
        attention = m["self_attn"]
        assert attention is not None
        a, f = attention._modules, moe._modules  # experts not a module: f lacks them
        return (
            *(m["input_layernorm"], m["self_attn"], a["q_proj"], a["k_proj"], a["v_proj"]),
            *(a["o_proj"], a["attend"], m["post_attention_layernorm"], moe, f["gate"]),
            *(f["router"], f.get("experts")),
        )

    def plan(self) -> Any:
        """The layer's DecodeBlock for its modules as they are now, or None where it has none."""
        parts = self.parts()
        if parts != self.planned_for:
            self.decode_plan, self.planned_for = block_plan(self.decode_block, parts), parts
        return self.decode_plan

    def forget(self) -> None:
        """Make the plan again at the next step (the tensors moved or were replaced)."""
        self.decode_plan = self.planned_for = None

    def __getstate__(self) -> dict[str, Any]:
        """The state without the plan, which holds C++ pointers and cannot be copied."""
        return {**super().__getstate__(), "decode_plan": None, "planned_for": None}


def block_plan(decode_block: type, parts: tuple[object, ...]) -> Any:
    """A DecodeBlock over `parts` (KernelBlock.parts), where the kernels take each of them as
    the layer's own modules run: 8-bit, 4-bit or bfloat16 products, resident 4-bit experts."""
    if not parts:
        return None
    norm_in, attention, q, k, v, o, attend, norm_post, moe, gate, router, experts = parts
    if not (
        isinstance(norm_in, KernelRMSNorm)
        and isinstance(norm_post, KernelRMSNorm)
        and norm_in.eps == norm_post.eps
        and type(attention) in (Attention, KernelProjections)
        and type(attend) is KernelAttention
        and isinstance(moe, MoeLayer)
        and type(router) is KernelRouter
        and type(experts) is KernelExperts
    ):
        return None
    specs = [linear_spec(m) for m in (q, k, v, o, gate)]
    if None in specs:
        return None
    norms = [norm_in.weight, norm_post.weight]
    try:
        return decode_block(
            norms, norm_in.eps, specs, experts.tensors, experts.group_size, moe.top_k
        )
    except RuntimeError:  # shapes or dtypes the kernels do not take
        return None


NO_SCALES = torch.empty(0)


def linear_spec(layer: object) -> tuple[Tensor, Tensor, int, int] | None:
    """(weight, scales, bits, group) of a product DecodeBlock runs as `layer` runs on the CPU:
    an unpadded 8- or 4-bit QuantLinear, or a bfloat16 KernelLinear; None for any other."""
    if isinstance(layer, QuantLinear):
        if layer.layout != "localmix" or layer.bits not in (4, 8) or padded(layer):
            return None
        return layer.qweight, layer.scales_zeros, layer.bits, layer.group_size
    if isinstance(layer, KernelLinear) and layer.weight.dtype == torch.bfloat16:
        return layer.weight, NO_SCALES, 16, 0
    return None


def adopt_children(module: nn.Module, source: nn.Module) -> None:
    """Initialise `module` (a subclass's instance) with `source`'s submodules, the same modules,
    not copies."""
    nn.Module.__init__(module)
    for name, child in source.named_children():
        setattr(module, name, child)


def padded(layer: QuantLinear) -> bool:
    """Whether the layer's weight is stored larger than its logical shape."""
    return layer.padded != (layer.out_features, layer.in_features)


def use_decode_kernels(model: nn.Module) -> None:
    """Swap `model`'s attention (8-bit projections and cores), routers and resident 4-bit
    experts for the kernel ones, where localmix's CPU kernels are built and run here (they leave
    any other step to the model's own code)."""
    kernels = cpu_kernels()
    if kernels is None:
        return
    for name, module in list(model.named_modules()):
        if type(module) is Attention and KernelProjections.fits(module):
            replace(model, name, KernelProjections(module, kernels))
        elif type(module) is GroupedAttention and module.head_dim % 8 == 0:
            replace(model, name, KernelAttention(module, kernels))
        elif type(module) is Router:
            replace(model, name, KernelRouter(module, kernels))
        elif type(module) is ResidentExperts and (fit := KernelExperts.fitting(module)):
            replace(model, name, KernelExperts(fit, kernels))
    for name, module in list(model.named_modules()):
        if type(module) is Block:
            replace(model, name, KernelBlock(module, kernels))
