"""The Mixtral transformer: RMSNorm, RoPE, grouped-query attention and a sparse MoE feed-forward.

Tensors carry no batch dimension: localmix runs one conversation at a time, so activations are
(tokens, features). Module names follow the Hugging Face checkpoint (less its `model.` prefix),
so a state dict loads without renaming.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import CacheStep, RollingKVCache


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 as the reference does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half convention of the Hugging Face weights).

    cos and sin are tabled per dtype for positions 0..end, the table doubling when a position
    passes its end: a decode step slices two rows instead of computing them (some ten dispatches).
    sin's first half is stored negated, so that rotating half of x is one `roll` (see
    `apply_rotary`).
    """

    FIRST_TABLE = 4096  # positions in the first table made for a dtype

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        # Computed on the CPU even while a model is built on the meta device (a few numbers;
        # PyTorch's meta arange would import torch._dynamo, over a second of start-up).
        steps = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu")
        inv_freq = 1.0 / (theta ** (steps / head_dim))
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, start: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos and signed sin (n, 1, head_dim) for the positions start..start+n-1."""
        key = (dtype, self.inv_freq.device)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < start + n:
            size = max(self.FIRST_TABLE, 1 << (start + n - 1).bit_length())
            positions = torch.arange(size, dtype=torch.float32, device=self.inv_freq.device)
            freqs = positions[:, None] * self.inv_freq[None, :]  # (positions, head_dim/2)
            emb = torch.cat([freqs, freqs], dim=-1)  # (positions, head_dim)
            cos, sin = emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]
            sin[..., : sin.shape[-1] // 2].neg_()
            table = self._tables[key] = cos, sin
        cos, sin = table
        return cos[start : start + n], sin[start : start + n]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (tokens, heads, head_dim) by the angles in cos/sin (tokens, 1, head_dim), sin's
    first half negated (`Rotary.cos_sin`).

    The reference's x * cos + cat(-x2, x1) * sin, bit for bit: (-a) * b == a * (-b) exactly,
    so cat(x2, x1), which is x rolled by half, times the signed sin gives the same products.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class GroupedAttention(nn.Module):
    """Attention of new tokens' projections to the cache: RoPE on queries and keys, keys and
    values stored through the cache step, softmax(q k^T / sqrt(head_dim)) v with query head h
    reading KV head h // (heads / kv_heads). No parameters; `Attention` holds the projections."""

    def __init__(self, layer: int, n_heads: int, n_kv: int, head_dim: int) -> None:
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, n_heads, n_kv, head_dim

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        step: CacheStep,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """(tokens, heads * head_dim) from q (tokens, heads * head_dim) and k, v (tokens,
        kv_heads * head_dim), unrotated."""
        t = q.shape[0]
        q = q.view(t, self.n_heads, self.head_dim)
        k = k.view(t, self.n_kv, self.head_dim)
        v = v.view(t, self.n_kv, self.head_dim)
        # queries and keys rotated together: (tokens, heads + kv heads, head_dim)
        q, k = apply_rotary(torch.cat([q, k], dim=1), *rope).split([self.n_heads, self.n_kv], 1)
        keys, values, mask = step.update_and_fetch(self.layer, k, v)  # (kv, keys, head_dim)
        # Query heads sharing a KV head attend together: (kv, n_rep * tokens, head_dim), no
        # copy of the keys. Head h uses KV head h // n_rep, as in the reference.
        n_rep = self.n_heads // self.n_kv
        q = q.view(t, self.n_kv, n_rep, self.head_dim).permute(1, 2, 0, 3)
        q = q.reshape(self.n_kv, n_rep * t, self.head_dim)
        if mask is not None:
            mask = mask.repeat(n_rep, 1)  # (n_rep * tokens, keys)
        # A leading batch dimension lets PyTorch pick its fused CPU kernel (faster than 3-D).
        out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask)
        out = out.view(self.n_kv, n_rep, t, self.head_dim).permute(2, 0, 1, 3)
        return out.reshape(t, self.n_heads * self.head_dim)


class Attention(nn.Module):
    """Grouped-query attention over a rolling KV cache."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(d, heads * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(heads * hd, d, bias=False)
        self.attend = GroupedAttention(layer, heads, kv, hd)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queries, keys and values of x (tokens, hidden)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self, x: torch.Tensor, step: CacheStep, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        q, k, v = self.project(x)
        return self.o_proj(self.attend(q, k, v, step, rope))


class Expert(nn.Module):
    """One SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DenseMLP(nn.Module):
    """Mistral's feed-forward: the same SwiGLU under the dense checkpoint's names."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ExpertProvider(Protocol):
    """Where a MoE layer gets its experts: resident modules, or an expert cache."""

    def predict(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """For a decode step, expert ids the provider wants to fetch ahead (on the device,
        not read yet), from the layer's input; None when it looks nowhere ahead."""
        ...

    def fetch(
        self, layer: int, experts: list[int], hidden: torch.Tensor, predicted: list[int]
    ) -> Iterable[tuple[int, nn.Module]]:
        """Yield (expert id, callable module) for each requested expert, in any order.

        `hidden` is the layer's input (tokens, hidden); `predicted`, what `predict` gave, read
        together with the routing (one host synchronisation for both).
        """
        ...

    def combine(self, x: torch.Tensor, weight: dict[int, float]) -> torch.Tensor | None:
        """For a decode step, the sum of weight[e] * expert e (x) in ascending e, in one call
        where the provider has a kernel for it; None to have the layer fetch and sum them."""
        ...


class ResidentExperts(nn.ModuleList):
    """A layer's experts held as ordinary modules (all resident); the default provider."""

    def predict(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return None

    def combine(self, x: torch.Tensor, weight: dict[int, float]) -> torch.Tensor | None:
        return None

    def fetch(
        self, layer: int, experts: list[int], hidden: torch.Tensor, predicted: list[int]
    ) -> Iterator[tuple[int, nn.Module]]:
        for e in experts:
            yield e, self[e]


# Called with a MoE layer's number and the experts it chose, (tokens, k) on the device, unread.
RoutingObserver = Callable[[int, torch.Tensor], None]


class RoutingRecorder:
    """Keeps the routing of each MoE layer's last forward, as an observer of the layers
    (`Transformer.observe_routing`); reads it from the device only when asked."""

    def __init__(self, layers: Iterable[int]) -> None:
        self.chosen: dict[int, torch.Tensor | None] = dict.fromkeys(layers)

    def __call__(self, layer: int, chosen: torch.Tensor) -> None:
        self.chosen[layer] = chosen

    def last_token(self) -> list[list[int]]:
        """The experts each layer chose for the last token it ran (layers x k; [] for a layer
        that has not run), read from the device in one synchronisation."""
        choices = list(self.chosen.values())
        ran = [c[-1] for c in choices if c is not None]
        rows = iter(torch.stack(ran).tolist() if ran else [])
        return [next(rows) if c is not None else [] for c in choices]


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's router: the top-k experts, weighted by a softmax over their logits.

    Computed as the reference does (softmax over all experts, keep the top k, renormalise),
    which equals a softmax over the top-k logits. Returns float32 weights (tokens, k) and
    expert ids (tokens, k), highest weight first.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (tokens, experts)
    weights, chosen = torch.topk(probs, top_k, dim=-1)  # (tokens, k)
    return weights / weights.sum(dim=-1, keepdim=True), chosen


class TokenRouting:
    """One token's routing, computed and not yet read: `chosen` (1, k) on the device for
    observers, and `read`, which brings the ids and weights to the host together with the ids of
    experts to fetch ahead, in one host synchronisation."""

    def __init__(self, weights: torch.Tensor, chosen: torch.Tensor) -> None:
        self.weights, self.chosen = weights, chosen  # (1, k) each, weights in the model's dtype

    def read(self, ahead: torch.Tensor | None) -> tuple[list[int], list[float], list[int]]:
        """The ids chosen, highest weight first, their weights (exact in float64) and the ids
        `ahead` holds."""
        parts = [self.chosen[0].double(), self.weights[0].double()]
        read = torch.cat(parts if ahead is None else [*parts, ahead.double()]).tolist()
        k = self.chosen.shape[1]
        return [int(e) for e in read[:k]], read[k : 2 * k], [int(e) for e in read[2 * k :]]


class Router(nn.Module):
    """Mixtral's router over the gate's logits (`route`). No parameters; the gate is the MoE
    layer's."""

    def __init__(self, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(logits, self.top_k)

    def one(self, logits: torch.Tensor) -> TokenRouting:
        """The routing of one token, logits (1, experts), weights rounded to the logits' dtype."""
        weights, chosen = self(logits)
        return TokenRouting(weights.to(logits.dtype), chosen)


class MoeLayer(nn.Module):
    """Sparse feed-forward: a router picks top-k experts per token from an injected provider.

    Expert outputs are summed in ascending expert id whatever order the provider serves them
    in, so an expert cache that runs resident experts first changes timing, never results.
    """

    def __init__(self, cfg: ModelConfig, layer: int, experts: ExpertProvider | None = None) -> None:
        super().__init__()
        self.layer, self.top_k = layer, cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.router = Router(self.top_k)
        if experts is None:
            experts = ResidentExperts(
                Expert(cfg.hidden_size, cfg.intermediate_size) for _ in range(cfg.num_local_experts)
            )
        self.experts = experts
        self.observer: RoutingObserver | None = None

    def observe(self, observer: RoutingObserver | None) -> None:
        """Hand each forward's routing to `observer` from now on (None: to nobody)."""
        self.observer = observer

    def use_experts(self, provider: ExpertProvider) -> None:
        """Serve this layer's experts from `provider` (an expert cache) from now on; the
        layer's own expert modules, if it held them, leave it."""
        del self.experts  # nn.Module removes a submodule, as it does a plain attribute
        self.experts = provider

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)  # (tokens, experts)
        if x.shape[0] == 1:  # decode: no gather/scatter needed
            routing = self.router.one(logits)
            if self.observer is not None:
                self.observer(self.layer, routing.chosen)
            ahead = self.experts.predict(x)  # ids to fetch ahead, still on the device
            ids, read, predicted = routing.read(ahead)
            weight = dict(zip(ids, read, strict=True))
            if (combined := self.experts.combine(x, weight)) is not None:
                return combined
            served = self.experts.fetch(self.layer, ids, x, predicted)
            outs = {e: f(x) * weight[e] for e, f in served}
            return sum_in_order((outs[e] for e in sorted(ids)), x)
        weights, chosen = self.router(logits)  # (tokens, k) each
        if self.observer is not None:
            self.observer(self.layer, chosen)
        weights = weights.to(x.dtype)
        used = torch.unique(chosen).tolist()  # ascending
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for e, expert in self.experts.fetch(self.layer, used, x, []):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)  # tokens routed to e
            outputs[e] = (rows, expert(x[rows]) * weights[rows, slot, None])
        out = torch.zeros_like(x)
        for e in used:
            rows, y = outputs[e]
            out.index_add_(0, rows, y)
        return out


def sum_in_order(terms: Iterable[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Add terms one by one onto zeros, the same order of additions as `index_add_`."""
    out = torch.zeros_like(like)
    for t in terms:
        out += t
    return out


class Block(nn.Module):
    """One transformer layer: attention then feed-forward, each around a residual."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe:
            self.block_sparse_moe = MoeLayer(cfg, layer)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size)

    @property
    def feed_forward(self) -> nn.Module:
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp

    def forward(
        self, x: torch.Tensor, step: CacheStep, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), step, rope)
        return h + self.feed_forward(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """Embedding, layers, final norm and output head; `forward` advances the KV cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Given its weight, Embedding skips its initialiser: on the meta device, where models are
        # built, that initialiser imports torch._dynamo (over a second of every start-up).
        embedding = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=embedding)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    def moe_layers(self) -> list[MoeLayer]:
        moes = [getattr(b, "block_sparse_moe", None) for b in self.layers]
        return [m for m in moes if isinstance(m, MoeLayer)]

    def observe_routing(self, observer: RoutingObserver | None) -> None:
        """Hand every MoE layer's routing to `observer` (see `MoeLayer.observe`)."""
        for moe in self.moe_layers():
            moe.observe(observer)

    def forward(
        self, tokens: torch.Tensor, cache: RollingKVCache, last_only: bool = False
    ) -> torch.Tensor:
        """Logits (tokens, vocab) for new `tokens` (n,), attending to what `cache` holds.

        With `last_only`, only the last position goes through the output head.
        """
        start = cache.next_pos
        with cache.step(tokens.shape[0]) as step:
            x = self.embed_tokens(tokens)  # (tokens, hidden)
            rope = self.rotary.cos_sin(start, tokens.shape[0], x.dtype)
            for block in self.layers:
                x = block(x, step, rope)
        if last_only:
            x = x[-1:]
        return self.lm_head(self.norm(x))
