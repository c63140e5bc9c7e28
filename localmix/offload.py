"""Expert offloading: the placement plan, the host expert store, and the cached expert provider.

The trunk (embeddings, attention, router, norms, head) and the KV cache live on the device;
every expert lives in host memory, packed in one contiguous buffer, and the device holds a few
of them per layer in preallocated slots managed by an `ExpertCache`. Routing decisions are the
model's own; the cache only decides where the weights come from, so outputs do not change.
"""

from __future__ import annotations

import copy
import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from . import hugepages
from .config import ModelConfig
from .errors import MemoryBudgetError, OptionError
from .expert_cache import ExpertCache, OffloadStats, make_policy
from .model import MoeLayer, ResidentExperts, Transformer, route
from .quant.names import TRUNK_PARTS, trunk_part
from .units import GiB, MiB, gib, mib

if TYPE_CHECKING:
    from .hybrid import Scheduler, Speeds

DEFAULT_PREFETCH = 1  # layers looked ahead; 2 rarely pays (see benchmarks/bench_nano.py)
# cuBLAS workspaces and the caching allocator's rounding and fragmentation, kept out of a CUDA
# plan (the CUDA context itself is already outside the free memory `mem_get_info` reports).
CUDA_ALLOCATOR_BYTES = 256 * MiB
# Host RAM a plan leaves to the rest of the machine beside the expert store.
HOST_MARGIN_BYTES = 2 * GiB
UNITS = {
    "": 1,
    "b": 1,
    "kb": 1024,
    "kib": 1024,
    "mb": MiB,
    "mib": MiB,
    "gb": GiB,
    "gib": GiB,
    "tb": 1024 * GiB,
}


def parse_bytes(text: str | int) -> int:
    """'12GB' -> bytes (binary units, as GPU memory is counted); ints pass through."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise OptionError(f"cannot read '{text}' as a memory size; write e.g. 12GiB or 16000MiB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def layer_experts(moe: MoeLayer) -> list[nn.Module]:
    """A MoE layer's own expert modules (before they are offloaded)."""
    if not isinstance(moe.experts, ResidentExperts):
        raise RuntimeError(f"layer {moe.layer}'s experts are already offloaded")
    return list(moe.experts)


def first_expert(model: Transformer) -> nn.Module:
    """The first MoE layer's first expert: every expert of a model has its shape."""
    return layer_experts(model.moe_layers()[0])[0]


@dataclass(frozen=True)
class Machine:
    """What a plan may use, in bytes: memory free on the device (None on the CPU, where the
    budget alone limits it) and host RAM available."""

    device_free: int | None
    host_free: int | None


def probe_machine(device: torch.device) -> Machine:
    """Free memory on `device` (torch.cuda.mem_get_info) and available host RAM, now."""
    from .options import available_memory

    device_free = available_memory(device) if device.type == "cuda" else None
    return Machine(device_free, available_memory(torch.device("cpu")))


def runtime_reserve(cfg: ModelConfig, context: int, scratch: int = 0) -> dict[str, int]:
    """Device memory a CUDA run needs beside weights and KV cache, by part.

    Activations of a prefill chunk in float32 (the residual stream and its temporaries, one
    expert's hidden states, attention scores should SDPA fall back to its math kernel, the
    chunk's logits), `scratch` for products that dequantize a weight first, and the
    allocator's share.
    """
    from .engine import PREFILL_CHUNK as chunk

    hidden = chunk * cfg.hidden_size * 12 * 4
    expert = chunk * cfg.intermediate_size * 3 * 4
    scores = chunk * cfg.num_attention_heads * context * 4
    logits = chunk * cfg.vocab_size * 4
    return {
        "prefill activations": hidden + expert + scores + logits,
        "dequantize scratch": scratch,
        "allocator, cuBLAS": CUDA_ALLOCATOR_BYTES,
    }


def dequantize_scratch(modules: Iterable[nn.Module], dtype: torch.dtype, fused_int4: bool) -> int:
    """Bytes the largest product that dequantizes its weight first needs on a GPU: 8-bit
    layers, and 4-bit ones where the GPU lacks the fused int4 kernel (the weight in `dtype`
    plus DEQUANT_ROWS rows of float32 temporaries)."""
    from .quant import QuantLinear
    from .quant.formats import DEQUANT_ROWS

    worst = 0
    for m in modules:
        if isinstance(m, QuantLinear) and not (m.bits == 4 and fused_int4):
            n_p, k_p = m.padded
            worst = max(worst, n_p * k_p * dtype.itemsize + DEQUANT_ROWS * k_p * 4 * 3)
    return worst


@dataclass
class Plan:
    """Where each part of the model goes, in bytes, and how many expert slots each layer gets."""

    device: str
    budget: int | None  # None: no limit given (slots chosen directly)
    trunk: dict[str, int]
    kv_cache: int
    reserve: dict[str, int]
    expert_bytes: int
    experts_per_layer: int
    slots: list[int]
    host_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def device_bytes(self) -> int:
        return (
            sum(self.trunk.values())
            + self.kv_cache
            + sum(self.reserve.values())
            + sum(self.slots) * self.expert_bytes
        )

    @property
    def all_resident(self) -> bool:
        """Every expert has a slot: nothing needs to be offloaded."""
        return min(self.slots) == self.experts_per_layer

    def to_dict(self) -> dict:
        return {**asdict(self), "device_bytes": self.device_bytes}

    def __str__(self) -> str:
        budget = gib(self.budget) if self.budget is not None else "not limited"
        lines = [f"placement on {self.device}, budget {budget}:"]
        for part, n in self.trunk.items():
            lines.append(f"  {part:<22}{gib(n):>12}")
        lines.append(f"  {'KV cache':<22}{gib(self.kv_cache):>12}")
        for part, n in self.reserve.items():
            if n:
                lines.append(f"  {part:<22}{gib(n):>12}")
        total_slots = sum(self.slots)
        lines.append(
            f"  {'expert slots':<22}{gib(total_slots * self.expert_bytes):>12}  "
            f"({total_slots} x {mib(self.expert_bytes)}; per layer "
            f"{min(self.slots)}-{max(self.slots)} of {self.experts_per_layer})"
        )
        lines.append(f"  {'device total':<22}{gib(self.device_bytes):>12}")
        lines.append(f"  {'host RAM for experts':<22}{gib(self.host_bytes):>12}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def trunk_bytes(model: Transformer) -> dict[str, int]:
    """Bytes of everything but the experts, by part."""
    parts = dict.fromkeys(TRUNK_PARTS, 0)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        part = trunk_part(name)
        if part is not None:
            parts[part] += t.nbytes
    return parts


def make_plan(
    cfg: ModelConfig,
    trunk: dict[str, int],
    expert_bytes: int,
    kv_bytes: int,
    budget: int | None,
    device: str,
    max_slots: int | None = None,
    *,
    machine: Machine | None = None,
    reserve: dict[str, int] | None = None,
) -> Plan:
    """Give the device memory left after trunk, KV cache and runtime reserve to expert slots,
    spread over the layers, and check that the rest fits in host RAM.

    The memory planned for is the `budget` (a cap the user gave) or what `machine` says is
    free on the device, whichever is smaller: never more than is free. Every layer gets the
    same share; slots left over go to the last layers, whose routing is the hardest to
    predict ahead of time; `max_slots` caps each layer's slots (0: every expert is computed on
    the CPU, the device holds none). A plan that cannot work is refused with the numbers,
    before anything is allocated: fewer than top_k slots per layer on the device, or an expert
    store larger than the host RAM available.
    """
    layers, experts, top_k = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
    if max_slots == 0:
        top_k = 0
    reserve = dict(reserve or {})
    notes = []
    free = machine.device_free if machine is not None else None
    limit = budget
    if free is not None and (limit is None or free < limit):
        if limit is not None:
            notes.append(f"the budget of {gib(limit)} is capped at the {gib(free)} free now")
        limit = free
    fixed = sum(trunk.values()) + kv_bytes + sum(reserve.values())
    minimum = fixed + layers * top_k * expert_bytes
    if limit is not None and limit < minimum:
        what = "free on the device" if limit == free else "in the device budget"
        raise MemoryBudgetError(
            f"{gib(limit)} {what} cannot hold the trunk ({gib(sum(trunk.values()))}), the KV "
            f"cache ({gib(kv_bytes)}), the runtime's working memory ({gib(sum(reserve.values()))}) "
            f"and {top_k} experts per layer ({gib(layers * top_k * expert_bytes)}): "
            f"{gib(minimum - limit)} short of the {gib(minimum)} needed; shrink the context "
            "or free the GPU"
        )
    total = layers * (experts if max_slots is None else max_slots)
    if limit is not None:
        total = min((limit - fixed) // expert_bytes, total)
    slots = [min(total // layers, experts)] * layers
    extra = total - sum(slots)
    for i in reversed(range(layers)):
        if extra <= 0:
            break
        if slots[i] < experts:
            slots[i] += 1
            extra -= 1
    if max_slots == 0:
        notes.append("every expert is computed on the CPU: the device holds the trunk only")
    host = layers * experts * expert_bytes
    if min(slots) < experts and machine is not None and machine.host_free is not None:
        if host + HOST_MARGIN_BYTES > machine.host_free:
            raise MemoryBudgetError(
                f"host RAM: the experts need {gib(host)} in host RAM (plus {gib(HOST_MARGIN_BYTES)} "
                f"left to the system), {gib(machine.host_free)} are available; close programs "
                "or use a machine with more RAM"
            )
    return Plan(device, limit, trunk, kv_bytes, reserve, expert_bytes, experts, slots, host, notes)


@dataclass(frozen=True)
class Slice:
    name: str  # the tensor's name inside one expert module
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def expert_layout(expert: nn.Module) -> tuple[list[Slice], int]:
    """Where each tensor of an expert goes in its packed buffer, and the buffer's size."""
    out, offset = [], 0
    for name, t in list(expert.named_parameters()) + list(expert.named_buffers()):
        out.append(Slice(name, t.dtype, tuple(t.shape), offset, t.nbytes))
        offset += hugepages.aligned(t.nbytes)  # each tensor on a cache line
    return out, offset


def views(buffer: torch.Tensor, layout: list[Slice]) -> dict[str, torch.Tensor]:
    """The tensors of one packed expert, as views of its uint8 buffer (no copy)."""
    return {
        s.name: buffer[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in layout
    }


def bind(template: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `template`'s module structure whose tensors are `tensors` (views, not copies)."""
    tensors_of = list(template.parameters()) + list(template.buffers())
    memo: dict[int, Any] = {id(t): torch.empty(0) for t in tensors_of}  # not copied
    module = copy.deepcopy(template, memo)
    for name, t in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[leaf] = t
    return module


Pinner = Callable[[torch.Tensor], bool]


def cuda_host_register(block: torch.Tensor) -> bool:
    """Page-lock a host tensor where it lies (cudaHostRegister): exactly its size, where
    PyTorch's pinned allocator would round a request up to a power of two."""
    status = torch.cuda.cudart().cudaHostRegister(block.data_ptr(), block.nbytes, 0)
    return int(status) == 0


def cuda_host_unregister(block: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(block.data_ptr())


def stored_form(expert: nn.Module, device: torch.device) -> nn.Module:
    """The expert as the device's kernels take it: on a CUDA device with the fused int4 kernel,
    a copy whose 4-bit layers were repacked there (so a miss is one copy, no repack); elsewhere
    the expert itself."""
    from .quant.linear import cuda_int4_kernel, use_device_kernels

    if device.type != "cuda" or not cuda_int4_kernel(device):
        return expert
    moved = bind(expert, {name: t.to(device) for name, t in module_tensors(expert)})
    use_device_kernels(moved)
    return moved


def module_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A module's parameters and buffers by name: what `bind` gives a copy of it."""
    return list(module.named_parameters()) + list(module.named_buffers())


def meta_copy(module: nn.Module) -> nn.Module:
    """`module`'s structure over meta tensors of its tensors' shapes: a template for `bind`."""
    return bind(module, {n: t.to("meta") for n, t in module_tensors(module)})


class ExpertStore:
    """Every expert of every layer in host memory, (layers, experts, bytes) uint8, each expert
    one contiguous row in the form the device's kernels take, so a move is one copy.

    For a CUDA device each layer's block is page-locked where it lies (`pinner`, normally
    `cuda_host_register`: no rounding of a 24 GB request up to 32); a layer whose block cannot
    be locked stays pageable, and the copy engine stages its copies through pinned buffers.
    With `for_cpu`, the store keeps localmix's own layout, which the CPU kernels read (hybrid
    execution computes experts from it); the device's form is then made after each copy.
    `progress(done, total)` is called as experts are filled in.
    """

    def __init__(
        self,
        model: Transformer,
        device: torch.device,
        pinner: Pinner | None = None,
        progress: Callable[[int, int], None] | None = None,
        for_cpu: bool = False,
    ) -> None:
        moes = model.moe_layers()
        form = (lambda expert, device: expert) if for_cpu else stored_form
        first = form(first_expert(model), device)
        self.layout, self.expert_bytes = expert_layout(first)
        self.template = meta_copy(first)
        n_layers, n_experts = len(moes), model.cfg.num_local_experts
        shape = (n_layers, n_experts, self.expert_bytes)
        # The CPU kernels read the experts they compute straight from here: on huge pages.
        self.host = (
            hugepages.zeros(shape, torch.uint8)
            if for_cpu
            else torch.empty(shape, dtype=torch.uint8)
        )
        self.pinned = [pinner(self.host[li]) if pinner else False for li in range(n_layers)]
        # Unlocked before the memory is freed, whenever that is: at close(), or when the store
        # is collected (a server that unloads a model just drops it).
        locked = [self.host[li] for li, p in enumerate(self.pinned) if p]
        unlock = cuda_host_unregister if pinner is cuda_host_register else None
        self._unlock = weakref.finalize(self, _unlock_all, unlock, locked)
        total, done = n_layers * n_experts, 0
        for li, moe in enumerate(moes):
            for ei, expert in enumerate(layer_experts(moe)):
                dst = views(self.host[li, ei], self.layout)
                for name, t in module_tensors(form(expert, device)):
                    dst[name].copy_(t)
                done += 1
                if progress:
                    progress(done, total)

    def module(self, layer: int, expert: int) -> nn.Module:
        return bind(self.template, views(self.host[layer, expert], self.layout))

    def modules(self) -> list[list[nn.Module]]:
        """Every stored expert as a module over its bytes (no copy), per layer."""
        n_layers, n_experts = self.host.shape[:2]
        return [[self.module(li, ei) for ei in range(n_experts)] for li in range(n_layers)]

    def close(self) -> None:
        """Unlock what was page-locked (before the memory is freed); once."""
        self._unlock()
        self.pinned = [False] * len(self.pinned)


def _unlock_all(unlock: Callable[[torch.Tensor], None] | None, blocks: list[torch.Tensor]) -> None:
    if unlock is not None:
        for block in blocks:
            unlock(block)


@dataclass(frozen=True)
class CopyJob:
    """One move host -> device: dst <- src once `after` (an event from a copy engine's
    `reader_done`, or None) has passed, then `then()` (device work that reads dst) in the same
    order. `pinned`: src is page-locked."""

    dst: torch.Tensor
    src: torch.Tensor
    after: Any
    pinned: bool
    then: Callable[[], None] | None = None


class CopyEngine(Protocol):
    """Moves bytes host -> device beside the compute, ordered by events.

    `copy` queues a `CopyJob` and returns an event marking the completion of its copy and its
    `then`; `wait` makes the compute that follows wait for an event; `reader_done` marks the
    compute queued so far (the last reader of what it read).
    """

    def copy(self, job: CopyJob) -> Any: ...

    def wait(self, event: Any) -> None: ...

    def reader_done(self) -> Any: ...


class ImmediateCopies:
    """The copy engine of a CPU "device": copies happen at once, in program order."""

    def copy(self, job: CopyJob) -> Any:
        job.dst.copy_(job.src)
        if job.then is not None:
            job.then()
        return None

    def wait(self, event: Any) -> None:
        pass

    def reader_done(self) -> Any:
        return None


class CudaCopies:
    """Copies on a stream of their own. A pageable source goes through a ring of pinned
    staging buffers (a host memcpy, then an asynchronous copy), each reused once its last copy
    has landed."""

    def __init__(self, device: torch.device, staging_bytes: int, staging: int = 4) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.staging_bytes, self.staging_count = staging_bytes, staging
        self.staging: list[torch.Tensor] = []
        self.staged: list[Any] = []
        self.next = 0

    def copy(self, job: CopyJob) -> Any:
        ring, src = None, job.src
        if not job.pinned:
            ring, src = self._stage(src)
        with torch.cuda.stream(self.stream):
            if job.after is not None:
                self.stream.wait_event(job.after)
            job.dst.copy_(src, non_blocking=True)
            if job.then is not None:
                job.then()  # queued on the copy stream, behind the copy
            event = torch.cuda.Event()
            event.record(self.stream)
        if ring is not None:
            self.staged[ring] = event
        return event

    def _stage(self, src: torch.Tensor) -> tuple[int, torch.Tensor]:
        if not self.staging:
            self.staging = [
                torch.empty(self.staging_bytes, dtype=torch.uint8, pin_memory=True)
                for _ in range(self.staging_count)
            ]
            self.staged = [None] * self.staging_count
        i = self.next
        self.next = (i + 1) % self.staging_count
        if self.staged[i] is not None:
            self.staged[i].synchronize()  # its previous copy has left the buffer
        buf = self.staging[i][: src.numel()]
        buf.copy_(src)
        return i, buf

    def wait(self, event: Any) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def reader_done(self) -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


class Repack:
    """Turns an expert copied to the device in the host store's layout (localmix's own, which
    the CPU kernels read) into the device kernels' layout in its slot, on the device.

    One staging buffer takes each copy; the repack that reads it is queued behind the copy on
    the same stream, so the next copy into it waits for that read.
    """

    def __init__(self, store: ExpertStore, device: torch.device) -> None:
        self.store = store
        self.staging = torch.empty(store.expert_bytes, dtype=torch.uint8, device=device)
        self.staged = bind(store.template, views(self.staging, store.layout))
        form = stored_form(bind(store.template, self._empty_like(store, device)), device)
        self.layout, self.slot_bytes = expert_layout(form)
        self.template = meta_copy(form)

    @staticmethod
    def _empty_like(store: ExpertStore, device: torch.device) -> dict[str, torch.Tensor]:
        return {s.name: torch.empty(s.shape, dtype=s.dtype, device=device) for s in store.layout}

    def into(self, dst: torch.Tensor) -> None:
        """Repack what the staging buffer holds into the slot bytes `dst`."""
        from .quant.linear import use_device_kernels

        fresh = bind(self.staged, dict(module_tensors(self.staged)))  # repacking replaces tensors
        use_device_kernels(fresh)
        out = views(dst, self.layout)
        for name, t in module_tensors(fresh):
            out[name].copy_(t)


class HostExperts:
    """Computes experts on the CPU from the host store, on a worker thread, while the device
    computes the resident ones. A decode step's hidden state goes to the host once per layer
    and each output comes back to the device."""

    def __init__(self, store: ExpertStore) -> None:
        self.modules = store.modules()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="localmix-cpu-experts")

    def submit(self, layer: int, experts: list[int], x: torch.Tensor) -> list[Future[torch.Tensor]]:
        """Start computing `experts` of `layer` on the host copy `x`; one future each."""
        return [self.pool.submit(self._run, self.modules[layer][e], x) for e in experts]

    @staticmethod
    def _run(expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # thread-local: the worker's own
            return expert(x)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class SlotMover:
    """Copies packed experts from the host store into device slots, through a copy engine.

    A copy into a slot waits for that slot's last reader only (not for all compute queued);
    the compute waits for a slot's copy only when it reads the slot.
    """

    def __init__(
        self,
        store: ExpertStore,
        slots: list[int],
        device: torch.device,
        engine: CopyEngine,
        repack: Repack | None = None,
        on_copy: Callable[[], object] | None = None,
    ) -> None:
        self.store, self.device, self.engine, self.repack = store, device, engine, repack
        self.on_copy = on_copy  # told of each copy queued (the scheduler's link backlog)
        slot_bytes = repack.slot_bytes if repack is not None else store.expert_bytes
        self.buffers = [
            torch.empty((n, slot_bytes), dtype=torch.uint8, device=device) for n in slots
        ]
        self.landed: dict[tuple[int, int], Any] = {}  # the copy each slot waits for
        self.last_read: dict[tuple[int, int], Any] = {}  # each slot's last reader

    def load(self, layer: int, expert: int, slot: int) -> None:
        src, dst = self.store.host[layer, expert], self.buffers[layer][slot]
        # The slot's last reader stays its last reader until another reads it: a prefetch that
        # is replaced before anyone reads it leaves the next copy waiting on the same reader.
        after = self.last_read.get((layer, slot))
        pinned = self.store.pinned[layer]
        if self.on_copy is not None:
            self.on_copy()
        repack = self.repack
        if repack is None:
            job = CopyJob(dst, src, after, pinned)
        else:  # into the staging buffer, then repacked into the slot, on the copy stream
            job = CopyJob(repack.staging, src, after, pinned, lambda: repack.into(dst))
        self.landed[layer, slot] = self.engine.copy(job)

    def slot_modules(self, layer: int) -> list[nn.Module]:
        """The modules that read each of `layer`'s slots (views of the slot bytes)."""
        template, layout = (
            (self.repack.template, self.repack.layout)
            if self.repack is not None
            else (self.store.template, self.store.layout)
        )
        return [bind(template, views(buf, layout)) for buf in self.buffers[layer]]

    def ready(self, layer: int, slot: int) -> None:
        self.engine.wait(self.landed.pop((layer, slot), None))

    def used(self, layer: int, slot: int) -> None:
        """The compute that read this slot has been queued."""
        self.last_read[layer, slot] = self.engine.reader_done()


class CachedExperts:
    """The expert provider of one MoE layer, served from the expert cache.

    While serving layer L in a decode step, it applies the gates of the next layers (the last
    layers: of the next token's first layers) to L's input and prefetches the experts they
    pick, behind L's own copies (the prediction only changes timing).

    With a `scheduler` and `host` (hybrid execution), a decode step's missed experts that the
    scheduler gives the CPU are computed there from the host store while the device computes
    the others; they are served last, as modules that return the CPU's result.
    """

    def __init__(
        self,
        layer: int,
        cache: ExpertCache,
        slot_modules: list[nn.Module],
        next_gates: Sequence[tuple[int, nn.Module]],
        top_k: int,
        mover: SlotMover,
        scheduler: Scheduler | None = None,
        host: HostExperts | None = None,
    ) -> None:
        self.layer, self.cache, self.slot_modules = layer, cache, slot_modules
        self.next_gates, self.top_k, self.mover = next_gates, top_k, mover
        self.scheduler, self.host = scheduler, host

    def predict(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The experts the next layers' gates pick from this decode step's input, on the device
        (the layer reads them with its own routing, in one synchronisation)."""
        if not self.next_gates or hidden.shape[0] != 1:
            return None
        return torch.cat([route(gate(hidden), self.top_k)[1][0] for _, gate in self.next_gates])

    def combine(self, x: torch.Tensor, weight: dict[int, float]) -> torch.Tensor | None:
        return None  # served one by one, as each lands

    def fetch(
        self, layer: int, experts: list[int], hidden: torch.Tensor, predicted: list[int]
    ) -> Iterator:
        host = self.host
        if not self.slot_modules and host is not None:  # every expert on the CPU, in turn
            self.cache.request(layer, experts, hidden.shape[0], experts)
            for e in experts:
                yield e, _OnHost(host.modules[layer][e], hidden.device)
            return
        on_cpu = self._choose(layer, experts) if hidden.shape[0] == 1 else []
        results: list[Future[torch.Tensor]] = []
        if on_cpu and host is not None:  # started first: the CPU works while the device computes
            results = host.submit(layer, on_cpu, hidden.to("cpu"))
        served = self.cache.request(layer, experts, hidden.shape[0], on_cpu)  # copies start
        for i, (target, _) in enumerate(self.next_gates):  # then predicted ones, behind them
            chosen = predicted[i * self.top_k : (i + 1) * self.top_k]
            if chosen and self._link_idle():
                self.cache.prefetch(target, chosen)
        if on_cpu and self.scheduler is not None:  # copied behind for next time, link allowing
            self.cache.load_behind(layer, self.scheduler.behind(on_cpu), experts)
        for expert, slot in served:
            yield expert, self.slot_modules[slot]
            self.mover.used(layer, slot)  # the caller has queued the compute that read it
        for expert, result in zip(on_cpu, results, strict=True):
            yield expert, Computed(result.result().to(hidden.device))

    def _link_idle(self) -> bool:
        """Whether a guess may take the link: always without speeds to go by; with them, only
        while less than one copy is queued (a copy queued on a stream cannot be taken back, so
        a guess is held back rather than left to delay the next layers' misses)."""
        s = self.scheduler
        return s is None or s.backlog() < s.costs.copy_s

    def _choose(self, layer: int, experts: list[int]) -> list[int]:
        """The missed experts the CPU computes (none without a scheduler and a CPU to run
        them on)."""
        if self.scheduler is None or self.host is None:
            return []
        where = self.cache.where[layer]
        missing = [e for e in experts if e not in where]
        return self.scheduler.choose(
            missing,
            len(experts) - len(missing),
            lambda e: self.cache.copy_value(layer, e, experts),
        )


class _OnHost:
    """An expert run on the CPU from the host store, for rows of the device's activations."""

    def __init__(self, expert: nn.Module, device: torch.device) -> None:
        self.expert, self.device = expert, device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.expert(x.to("cpu")).to(self.device)


class Computed:
    """An expert already computed elsewhere (what `CachedExperts.fetch` yields for an expert
    the CPU ran): called on the layer's input, returns its output."""

    def __init__(self, output: torch.Tensor) -> None:
        self.output = output

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.output


class Offload:
    """Wires an expert cache into a loaded model (replacing its resident experts).

    `mode` says where missed experts run (see `localmix.hybrid`): "gpu" copies each one, "cpu"
    computes every expert on the CPU (the plan then has no slots), "hybrid" asks a scheduler
    built from `speeds` per miss. Outside "gpu" the host store keeps the CPU kernels' layout.
    """

    def __init__(
        self,
        model: Transformer,
        plan: Plan,
        device: torch.device,
        policy: str,
        prefetch: int,
        engine: CopyEngine | None = None,
        progress: Callable[[int, int], None] | None = None,
        mode: str = "gpu",
        speeds: Speeds | None = None,
    ) -> None:
        from .hybrid import MODES, Scheduler

        if mode not in MODES:
            raise OptionError(f"unknown experts mode '{mode}'; use one of {', '.join(MODES)}")
        if mode != "gpu" and speeds is None:
            raise ValueError("hybrid and CPU experts need the machine's speeds")
        cfg = model.cfg
        moes: list[MoeLayer] = model.moe_layers()
        self.plan, self.device, self.mode, self.speeds = plan, device, mode, speeds
        cuda = device.type == "cuda"
        pinner = cuda_host_register if cuda else None
        self.store = ExpertStore(model, device, pinner, progress, for_cpu=mode != "gpu")
        repack = None
        if mode == "hybrid" and cuda:
            repack = Repack(self.store, device)
            if repack.layout == self.store.layout:
                repack = None  # the device reads the host layout as it is
        if engine is None:
            engine = CudaCopies(device, self.store.expert_bytes) if cuda else ImmediateCopies()
        self.scheduler = (
            Scheduler(speeds.costs(self.store.expert_bytes), mode) if speeds is not None else None
        )
        scheduler = self.scheduler
        on_copy = (lambda: scheduler.queued(1)) if scheduler is not None else None
        self.mover = SlotMover(self.store, plan.slots, device, engine, repack, on_copy)
        if self.mover.buffers and self.mover.buffers[0].shape[1] != plan.expert_bytes:
            raise RuntimeError("plan and store disagree on the expert size")
        self.cache = ExpertCache(plan.slots, make_policy(policy), self.mover, plan.expert_bytes)
        self.host = HostExperts(self.store) if mode != "gpu" else None
        for li, moe in enumerate(moes):
            # The next `prefetch` layers' gates; the last layers' wrap around to the first
            # layers of the next token (a decode step's last hidden state predicts them).
            ahead = [(li + j) % len(moes) for j in range(1, prefetch + 1)]
            gates = [(t, moes[t].gate) for t in ahead if t != li and plan.slots[t]]
            moe.use_experts(
                CachedExperts(
                    li,
                    self.cache,
                    self.mover.slot_modules(li),
                    gates,
                    cfg.num_experts_per_tok,
                    self.mover,
                    self.scheduler,
                    self.host,
                )
            )

    def close(self) -> None:
        """Stop the CPU worker and unlock the host store."""
        if self.host is not None:
            self.host.close()
        self.store.close()

    def stats(self) -> OffloadStats:
        """The expert cache's statistics so far."""
        return self.cache.report()


def plan_for(
    cfg: ModelConfig,
    quantization: dict | None,
    budget: int | None,
    device: str,
    context: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    machine: Machine | None = None,
    max_slots: int | None = None,
    fused_int4: bool = True,
    mode: str = "gpu",
) -> Plan:
    """The plan for a model described by its config (and manifest), without loading weights:
    the model is built on the meta device. `fused_int4`: the GPU runs PyTorch's fused int4
    kernel (sm80+), so 4-bit products need no dequantize scratch."""
    from .loader import quantize_modules

    with torch.device("meta"):
        model = Transformer(cfg)
        model.to(dtype)
    if quantization is not None:
        quantize_modules(model, quantization)
    kv = (
        2
        * cfg.num_hidden_layers
        * cfg.num_key_value_heads
        * context
        * cfg.head_dim
        * dtype.itemsize
    )
    expert = first_expert(model)
    return plan_model(
        model,
        expert,
        kv,
        budget,
        device,
        context,
        dtype,
        machine=machine,
        max_slots=max_slots,
        fused_int4=fused_int4,
        mode=mode,
    )


def plan_model(
    model: Transformer,
    expert: nn.Module,
    kv_bytes: int,
    budget: int | None,
    device: str,
    context: int,
    dtype: torch.dtype,
    *,
    machine: Machine | None = None,
    max_slots: int | None = None,
    fused_int4: bool = True,
    mode: str = "gpu",
) -> Plan:
    """The plan for `model` (loaded, or built on the meta device), whose experts are shaped like
    `expert` (one of its own, or the expert store's template once they left the model): trunk
    and expert sizes from the modules, the runtime's working memory on CUDA. In `mode` "cpu"
    the device holds no expert; in "hybrid" on CUDA it also holds one expert's staging buffer
    (copies arrive in the CPU kernels' layout and are repacked there)."""
    reserve = None
    _, expert_bytes = expert_layout(expert)
    if device.startswith("cuda"):
        modules = [*model.modules(), *expert.modules()]
        reserve = runtime_reserve(
            model.cfg, context, dequantize_scratch(modules, dtype, fused_int4)
        )
        if mode == "hybrid" and fused_int4:
            reserve["repack staging"] = expert_bytes
    return make_plan(
        model.cfg,
        trunk_bytes(model),
        expert_bytes,
        kv_bytes,
        budget,
        device,
        0 if mode == "cpu" else max_slots,
        machine=machine,
        reserve=reserve,
    )
