"""Hybrid expert execution: a routed expert that is not on the device is either copied there
(and joins the expert cache) or computed on the CPU from the host store, whichever the cost
model says finishes the layer sooner.

The cost model is built from speeds (`Speeds`): the link's GB/s for a packed expert, the GB/s of
localmix's CPU kernel and of the device's kernel on one decode token, and the round trip of one
hidden state. The runtime measures them at start-up (`measure_speeds`, cached per machine); for
a machine that is not this one they come from its datasheet figures (`MachineSpec`). The same
`Scheduler` decides in the runtime (`offload.CachedExperts`) and in the decode simulator
(`simulate`), which replays a routing trace through the real `ExpertCache` on a virtual clock.

Modes: `gpu` copies every miss (pure offloading), `cpu` computes every expert on the CPU (the
device holds the trunk only, as llama.cpp's `--cpu-moe`), `hybrid` chooses per miss.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from .expert_cache import ExpertCache, make_policy
from .units import GB

MODES = ("gpu", "cpu", "hybrid")
# Practical pinned host-to-device rate of an x16 link, by PCIe generation: below the
# signalling rate, as copy benchmarks report it on desktop boards, and the figure the rest of
# localmix's estimates take (benchmarks/bench_offload.py).
PCIE_GBPS = {3: 12.0, 4: 24.0, 5: 48.0}
# Share of a card's memory bandwidth that a one-token 4-bit product reaches (PyTorch's fused
# int4 kernel); an assumption until a GPU run measures it (benchmarks/bench_gpu.py).
DEVICE_KERNEL_EFFICIENCY = 0.6
# Host work per MoE layer of a decode step on a GPU (Python, kernel launches, the one routing
# read), and per token (head, sampling); assumptions until a GPU run measures them.
GPU_LAYER_OVERHEAD_S = 0.25e-3
GPU_TOKEN_OVERHEAD_S = 1.0e-3
# One hidden state to the host and one expert output back, with the synchronisation.
GPU_HANDOFF_S = 60e-6


@dataclass(frozen=True)
class Speeds:
    """How fast one machine moves and computes experts, for one decode token.

    `layer_s`: device time per MoE layer outside the experts (attention, router, norms, the
    host's share); `token_s`: per token outside the layers (head, sampling). Both only enter
    predictions, not choices.
    """

    link_gbps: float
    cpu_gbps: float
    device_gbps: float
    handoff_s: float
    layer_s: float = 0.0
    token_s: float = 0.0
    source: str = "measured"

    def costs(self, expert_bytes: int) -> Costs:
        return Costs(
            copy_s=expert_bytes / (self.link_gbps * GB),
            cpu_s=expert_bytes / (self.cpu_gbps * GB),
            device_s=expert_bytes / (self.device_gbps * GB),
            handoff_s=self.handoff_s,
        )

    def with_trunk(self, trunk: dict[str, int], layers: int) -> Speeds:
        """These speeds with the device's time for the trunk's bytes added: per layer its
        attention, router and norms, per token the output head, read at the device experts'
        rate."""
        rate = self.device_gbps * GB
        per_layer = trunk.get("attention", 0) + trunk.get("router", 0) + trunk.get("norms", 0)
        return replace(
            self,
            layer_s=self.layer_s + per_layer / max(layers, 1) / rate,
            token_s=self.token_s + trunk.get("output head", 0) / rate,
        )

    def describe(self) -> str:
        return (
            f"link {self.link_gbps:.1f} GB/s, CPU experts {self.cpu_gbps:.1f} GB/s, device "
            f"experts {self.device_gbps:.0f} GB/s ({self.source})"
        )


@dataclass(frozen=True)
class Costs:
    """Seconds for one expert of one decode token: copied over the link, computed on the CPU
    or on the device; and the hand-off of a hidden state to the CPU and back."""

    copy_s: float
    cpu_s: float
    device_s: float
    handoff_s: float


class Scheduler:
    """Chooses, for each decode layer, which of its missed experts the CPU computes.

    It keeps an estimate of when the link finishes the copies queued on it (`queued`), so a
    miss behind a backlog of prefetches is weighed with that wait. A choice minimises the
    layer's finishing time (the device's resident experts, then the copied ones as they land,
    against the CPU's experts in parallel), less the future misses a copy is expected to save
    (`value`: how much likelier the copied expert is to be reused than what it evicts). Ties go
    to the copy, so the cache keeps learning.
    """

    def __init__(
        self, costs: Costs, mode: str = "hybrid", clock: Callable[[], float] = time.perf_counter
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown experts mode '{mode}'; use one of {', '.join(MODES)}")
        self.costs, self.mode, self.clock = costs, mode, clock
        self.link_free = 0.0  # when the copies queued so far are expected to have landed

    def backlog(self) -> float:
        """Seconds of copies still queued on the link."""
        return max(self.link_free - self.clock(), 0.0)

    def queued(self, copies: int) -> list[float]:
        """`copies` experts were queued on the link now; when each is expected to land."""
        start = max(self.link_free, self.clock())
        lands = [start + (i + 1) * self.costs.copy_s for i in range(copies)]
        if lands:
            self.link_free = lands[-1]
        return lands

    def layer_time(self, resident: int, copied: int, on_cpu: int, backlog: float) -> float:
        """Seconds until a layer's experts are done, from now."""
        c = self.costs
        device = resident * c.device_s
        if copied:
            device = max(device, backlog + copied * c.copy_s) + copied * c.device_s
        cpu = c.handoff_s + on_cpu * c.cpu_s if on_cpu else 0.0
        return max(device, cpu)

    def behind(self, on_cpu: Sequence[int]) -> list[int]:
        """Of the experts the CPU computes now, those to copy to the device as well, behind
        the layer's own work, so the cache keeps learning: as many as the link can take
        while it has less than one copy queued."""
        if self.mode != "hybrid":
            return []
        backlog, out = self.backlog(), []
        for e in on_cpu:
            if backlog >= self.costs.copy_s:
                break
            out.append(e)
            backlog += self.costs.copy_s
        return out

    def choose(
        self, missing: Sequence[int], resident: int, value: Callable[[int], float]
    ) -> list[int]:
        """The experts of `missing` to compute on the CPU; the rest are copied."""
        if self.mode == "gpu" or not missing:
            return []
        if self.mode == "cpu":
            return list(missing)
        backlog = self.backlog()
        saved = min(self.costs.copy_s, self.costs.cpu_s)  # what a future miss costs
        worth = {e: value(e) for e in missing}  # once per miss, not once per split
        best: tuple[float, int] | None = None
        choice: list[int] = []
        for mask in range(1 << len(missing)):
            on_cpu = [e for i, e in enumerate(missing) if mask >> i & 1]
            copied = [e for e in missing if e not in on_cpu]
            t = self.layer_time(resident, len(copied), len(on_cpu), backlog)
            t -= saved * sum(worth[e] for e in copied)
            key = (t, len(on_cpu))
            if best is None or key < best:
                best, choice = key, on_cpu
        return choice


@dataclass(frozen=True)
class MachineSpec:
    """A machine described by its datasheet: the card's memory and bandwidth, the PCIe
    generation of its x16 link, the host RAM's bandwidth and the CPU's cores."""

    name: str
    card_gb: int
    usable_gib: float  # what CUDA leaves free on an idle card of that size
    pcie: int
    device_gbps: float
    host_gbps: float
    # Recorded for the report only: with a desktop's cores localmix's one-token expert kernel is
    # bound by memory bandwidth, so the CPU's rate comes from `host_gbps` and the efficiency.
    cores: int

    def speeds(self, cpu_efficiency: float) -> Speeds:
        """Speeds from the datasheet; the CPU kernel reaches `cpu_efficiency` of the RAM's
        bandwidth (the share measured on the machine that runs this)."""
        return Speeds(
            link_gbps=PCIE_GBPS[self.pcie],
            cpu_gbps=self.host_gbps * cpu_efficiency,
            device_gbps=self.device_gbps * DEVICE_KERNEL_EFFICIENCY,
            handoff_s=GPU_HANDOFF_S,
            layer_s=GPU_LAYER_OVERHEAD_S,
            token_s=GPU_TOKEN_OVERHEAD_S,
            source=f"{self.name} datasheet",
        )


MACHINES = {
    "rtx3060": MachineSpec("RTX 3060 12GB, PCIe 4.0, dual-channel DDR5", 12, 11.76, 4, 360, 50, 8),
    "rtx4060ti": MachineSpec("RTX 4060 Ti 16GB, PCIe 4.0, DDR5", 16, 15.6, 4, 288, 50, 8),
    "rtx3090": MachineSpec("RTX 3090 24GB, PCIe 4.0, DDR4", 24, 23.65, 4, 936, 40, 8),
    "rtx4090": MachineSpec("RTX 4090 24GB, PCIe 4.0, DDR5", 24, 23.65, 4, 1008, 60, 16),
}


# -- the decode simulator --------------------------------------------------------------------


@dataclass
class Prediction:
    """What the simulator predicts for one mode and plan."""

    mode: str
    slots_per_layer: float  # the plan's slots, averaged over the layers
    tokens_per_s: float
    hit_rate: float
    on_cpu_per_token: float
    copies_per_token: float
    seconds: dict[str, float] = field(default_factory=dict)  # per token, by part

    def to_dict(self) -> dict:
        return asdict(self)


def simulate(
    tokens: Sequence[dict[int, list[int]]],
    slots: Sequence[int],
    expert_bytes: int,
    speeds: Speeds,
    mode: str,
    policy: str = "transition",
) -> Prediction:
    """Decode `tokens` (per token, each MoE layer's routed experts) on a virtual clock through
    the runtime's `ExpertCache` and `Scheduler`: per layer the device's trunk share, then the
    experts (resident ones on the device, missed ones copied or on the CPU as the scheduler
    says). Prefetch is left out: the trace holds no hidden states to predict from, so the
    figures are what demand loading gives, in every mode alike."""
    layers = len(slots)
    now = 0.0
    clock = lambda: now  # noqa: E731 - the scheduler reads the virtual time
    costs = speeds.costs(expert_bytes)
    if mode == "cpu":
        slots = [0] * layers
    cache = ExpertCache(list(slots), make_policy(policy), None, expert_bytes)
    scheduler = Scheduler(costs, mode, clock)
    parts = {"trunk": 0.0, "experts": 0.0}
    landed: dict[tuple[int, int], float] = {}  # when each copy lands
    for token in tokens:
        for layer in range(layers):
            now += speeds.layer_s
            parts["trunk"] += speeds.layer_s
            experts = token.get(layer)
            if not experts:
                continue
            start = now
            where = cache.where[layer]
            missing = [e for e in experts if e not in where]
            resident = [e for e in experts if e in where]
            value = partial(cache.copy_value, layer, needed=experts)
            on_cpu = scheduler.choose(missing, len(resident), value)
            copied = [e for e in missing if e not in on_cpu]
            list(cache.request(layer, experts, 1, elsewhere=on_cpu))
            for e, land in zip(copied, scheduler.queued(len(copied)), strict=True):
                landed[layer, e] = land
            behind = scheduler.behind(on_cpu)
            cache.load_behind(layer, behind, experts)
            for e, land in zip(behind, scheduler.queued(len(behind)), strict=True):
                landed[layer, e] = land
            device = now
            for e in resident + copied:  # in the order the device gets them
                device = max(device, landed.get((layer, e), 0.0)) + costs.device_s
            cpu = now + costs.handoff_s + len(on_cpu) * costs.cpu_s if on_cpu else now
            now = max(device, cpu)
            parts["experts"] += now - start
        now += speeds.token_s
        parts["trunk"] += speeds.token_s
    n = max(len(tokens), 1)
    total = cache.stats.total()
    loads = total.loads + total.prefetch_loads
    return Prediction(
        mode=mode,
        slots_per_layer=sum(slots) / max(layers, 1),
        tokens_per_s=n / now if now > 0 else 0.0,
        hit_rate=total.hit_rate,
        on_cpu_per_token=total.elsewhere / n,
        copies_per_token=loads / n,
        seconds={k: v / n for k, v in parts.items()},
    )


def fastest(predictions: dict[str, Prediction]) -> str:
    """The mode with the most tokens/s (ties: gpu, then hybrid, then cpu)."""
    order = {"gpu": 0, "hybrid": 1, "cpu": 2}
    return max(predictions, key=lambda m: (predictions[m].tokens_per_s, -order[m]))


def report(mode: str, predictions: dict[str, Prediction], speeds: Speeds | None, auto: bool) -> str:
    """One line for `run -v` and `show`: where missed experts run, why, and what each mode is
    predicted to decode at on this machine."""
    what = {
        "gpu": "copied to the device",
        "cpu": "all computed on the CPU",
        "hybrid": "per miss, copied or computed on the CPU",
    }[mode]
    if not predictions:
        return f"experts: {mode} ({what}); nothing to choose between on a CPU device"
    why = "the fastest predicted here" if auto else "as asked"
    figures = ", ".join(
        f"{m} {p.tokens_per_s:.1f}"
        for m, p in sorted(predictions.items(), key=lambda mp: -mp[1].tokens_per_s)
    )
    speeds_text = f"; {speeds.describe()}" if speeds is not None else ""
    return f"experts: {mode} ({what}), {why}; predicted decode tok/s: {figures}{speeds_text}"


def plans_by_mode(plan: Callable[[str], Any], modes: Sequence[str], required: str | None) -> dict:
    """Each of `modes`' placement plan (`plan(mode)`), leaving out a mode that does not fit
    (its MemoryBudgetError) unless it is the `required` one."""
    from .errors import MemoryBudgetError

    plans = {}
    for mode in modes:
        try:
            plans[mode] = plan(mode)
        except MemoryBudgetError:
            if mode == required:
                raise
    return plans


def predict_plans(cfg, plans: dict, speeds: Speeds, policy: str = "transition") -> dict:
    """The decode speed each mode's plan (`offload.Plan`) predicts for a model of `cfg` with
    `speeds`, on the routing `routing_for` gives (Mixtral's own for a top-2-of-8 model)."""
    layers = cfg.num_hidden_layers
    tokens, _ = routing_for(layers, cfg.num_local_experts, cfg.num_experts_per_tok)
    return {
        mode: simulate(
            tokens,
            plan.slots,
            plan.expert_bytes,
            speeds.with_trunk(plan.trunk, layers),
            mode,
            policy,
        )
        for mode, plan in plans.items()
    }


# -- speeds of this machine ------------------------------------------------------------------


def speeds_path() -> Path:
    from .store import home

    return home() / "speeds.json"


def cached_speeds(key: str) -> Speeds | None:
    """The speeds measured before on this machine for `key`, if any: a file that is missing,
    damaged or holds values no measurement gives (rates that are not positive finite numbers,
    negative times) counts as no record, and the speeds are measured again."""
    try:
        speeds = Speeds(**json.loads(speeds_path().read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    rates = (speeds.link_gbps, speeds.cpu_gbps, speeds.device_gbps)
    times = (speeds.handoff_s, speeds.layer_s, speeds.token_s)
    numbers = rates + times
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
        return None
    if not all(math.isfinite(n) for n in numbers) or min(rates) <= 0 or min(times) < 0:
        return None
    return speeds


def remember_speeds(key: str, speeds: Speeds) -> None:
    path = speeds_path()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = asdict(replace(speeds, source="measured on this machine"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs a measurement next time


def bundled_routing() -> list[dict[int, list[int]]]:
    """Mixtral-8x7B's routing of 340 decoded tokens (localmix/data/mixtral_8x7b_routing.txt)."""
    path = Path(__file__).parent / "data" / "mixtral_8x7b_routing.txt"
    tokens = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        tokens.append({li: [int(c) for c in f] for li, f in enumerate(line.split()) if f != "-"})
    return tokens


def routing_for(layers: int, experts: int, top_k: int) -> tuple[list[dict[int, list[int]]], str]:
    """Routing to predict a model's decode speed with, and where it comes from: Mixtral's own
    for a top-2-of-8 model (its layers repeated or cut to `layers`), otherwise a seeded uniform
    choice (no locality: a cautious figure)."""
    if (experts, top_k) == (8, 2):
        real = bundled_routing()
        return [
            {li: t[li % 32] for li in range(layers) if li % 32 in t} for t in real
        ], "Mixtral-8x7B's routing on HumanEval"
    import random

    rng = random.Random(0)
    tokens = [{li: rng.sample(range(experts), top_k) for li in range(layers)} for _ in range(256)]
    return tokens, "uniform random routing"


def machine_key(device: str, expert_bytes: int) -> str:
    """What speeds are cached under: this CPU, its threads, the device, the expert's size."""
    import torch

    from .quant.kernels import cpu_features

    cpu = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else device
    features = "+".join(sorted(cpu_features()))
    return f"{cpu} [{features}] x{torch.get_num_threads()} | {gpu} | {expert_bytes} B"


def measure_speeds(expert, device, hidden: int, dtype) -> Speeds:
    """Time one expert (a host module in localmix's layout) on this machine, in well under a
    second: its CPU kernels on one token, its bytes over the link, the device's kernels on
    one token (in the device's own form), and the hand-off of a hidden state."""
    import torch

    from .offload import expert_layout, module_tensors, stored_form, views

    device = torch.device(device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def best(run: Callable[[], object], repeats: int = 3) -> float:
        run()  # warm: kernels built, caches filled
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    layout, nbytes = expert_layout(expert)
    x = torch.randn(1, hidden, dtype=dtype)
    with torch.inference_mode():
        cpu_s = best(lambda: expert(x))
        packed = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        for name, t in module_tensors(expert):
            views(packed, layout)[name].copy_(t)
        on_device = torch.empty(nbytes, dtype=torch.uint8, device=device)
        link_s = best(lambda: on_device.copy_(packed, non_blocking=True))
        resident = stored_form(expert, device) if cuda else expert
        xd = x.to(device)
        device_s = best(lambda: resident(xd))
        handoff_s = best(lambda: resident(xd).to("cpu").to(device), repeats=5) - device_s
    return Speeds(
        link_gbps=nbytes / link_s / GB,
        cpu_gbps=nbytes / cpu_s / GB,
        device_gbps=nbytes / device_s / GB,
        handoff_s=max(handoff_s, 0.0),
        layer_s=GPU_LAYER_OVERHEAD_S if cuda else 0.0,
        token_s=GPU_TOKEN_OVERHEAD_S if cuda else 0.0,
    )


def machine_speeds(
    expert: Callable[[], Any], device: str, hidden: int, dtype, expert_bytes: int
) -> Speeds:
    """This machine's speeds: remembered from an earlier run, or measured now on the module
    `expert()` makes (made only then) and kept."""
    key = machine_key(device, expert_bytes)
    speeds = cached_speeds(key)
    if speeds is None:
        speeds = measure_speeds(expert(), device, hidden, dtype)
        remember_speeds(key, speeds)
    return speeds


def random_expert(cfg, quantization: dict | None, dtype):
    """An expert of the model's shape and format, with random codes: what speeds are measured
    on before any weights are read (the speeds do not depend on the values)."""
    import torch

    from .loader import quantize_modules
    from .model import Transformer
    from .offload import first_expert
    from .quant.linear import use_device_kernels

    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    if quantization is not None:
        quantize_modules(model, quantization)
    expert = first_expert(model).to_empty(device="cpu")
    use_device_kernels(expert)  # the CPU kernels a loaded model's experts run
    gen = torch.Generator().manual_seed(0)
    for t in list(expert.parameters()) + list(expert.buffers()):
        if t.dtype == torch.uint8:
            t.data.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=gen))
        else:
            t.data.normal_(0, 0.02, generator=gen)
    return expert.requires_grad_(False)


def modes_here(cfg, quantization: dict | None, device: str, context: int, machine, dtype) -> str:
    """`report` for a model not loaded yet (`localmix show`): each mode planned on `machine`,
    speeds remembered for this machine or measured on an expert of random codes."""
    from .offload import plan_for

    def plan(mode: str) -> Any:
        return plan_for(cfg, quantization, None, device, context, dtype, machine=machine, mode=mode)

    plans = plans_by_mode(plan, MODES, required=None)
    if not plans:
        return "experts: no mode fits this machine"
    expert_bytes = next(iter(plans.values())).expert_bytes
    speeds = machine_speeds(
        lambda: random_expert(cfg, quantization, dtype),
        device,
        cfg.hidden_size,
        dtype,
        expert_bytes,
    )
    predictions = predict_plans(cfg, plans, speeds)
    return report(fastest(predictions), predictions, speeds, auto=True)
