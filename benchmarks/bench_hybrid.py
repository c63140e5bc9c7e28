"""The decode simulator: Mixtral-8x7B's predicted decode speed in each experts mode (gpu: copy
every miss; cpu: every expert on the CPU; hybrid: per miss, the faster) on named machines or
one described on the command line, from a real routing trace.

    python -m benchmarks.bench_hybrid [--machines rtx3060 rtx4090] [--trace PATH]
        [--card-gb 12 --pcie 4 --host-gbps 50 --device-gbps 360]
        [--efficiency E] [--slots 2 3 4 6 8] [--tokens N] [--out PATH]

The trace goes through the runtime's own `ExpertCache` and `Scheduler` on a virtual clock
(`localmix.hybrid.simulate`); placement comes from the runtime's planner for each card. A named
machine's link, card and RAM figures are datasheet values; how close localmix's CPU expert
kernel comes to the RAM's bandwidth is measured here, in this run (the kernel's GB/s on a
Mixtral-sized expert over a plain read of host memory, interleaved, best of each), unless
`--efficiency` is given. Prefetch is left out in every mode alike: a trace holds no hidden
states to predict from.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from localmix.quant.convert import Settings

from localmix.config import MIXTRAL_8X7B, ModelConfig
from localmix.hybrid import MACHINES, MODES, MachineSpec, random_expert, simulate
from localmix.offload import Machine, plan_for
from localmix.trace import read_trace
from localmix.units import GB, GiB

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRACE = ROOT.parent / "shared" / "traces" / "humaneval_2_routing.jsonl"
TRACE = SHARED_TRACE if SHARED_TRACE.exists() else ROOT / "tests/data/humaneval_2_routing.jsonl"
DEFAULTS = Settings().to_dict()  # what `localmix pull` writes: 4-bit g64 experts, 8-bit trunk


def cpu_efficiency(repeats: int = 5) -> tuple[float, float, float]:
    """(kernel GB/s, read GB/s, their ratio) on this machine, measured interleaved, on a
    Mixtral-8x7B expert of random codes in the format pull writes."""
    expert = random_expert(ModelConfig.from_dict(MIXTRAL_8X7B), DEFAULTS, torch.bfloat16)
    nbytes = sum(t.nbytes for t in expert.buffers())
    block = torch.ones(nbytes // 4, dtype=torch.float32)
    x = torch.randn(1, 4096, dtype=torch.bfloat16)
    kernel, read = [], []
    with torch.inference_mode():
        expert(x), block.sum()  # warm: kernels built, pages touched
        for _ in range(repeats):
            t = time.perf_counter()
            expert(x)
            kernel.append(nbytes / (time.perf_counter() - t) / GB)
            t = time.perf_counter()
            block.sum()
            read.append(block.nbytes / (time.perf_counter() - t) / GB)
    k, r = max(kernel), max(read)  # the best of each: what the hardware does when left alone
    return k, r, min(k / r, 1.0)


def custom_machine(args: argparse.Namespace) -> MachineSpec:
    usable = {12: 11.76, 16: 15.6, 24: 23.65}.get(args.card_gb, args.card_gb * 0.98)
    return MachineSpec(
        f"{args.card_gb} GB card, PCIe {args.pcie}.0, {args.host_gbps:g} GB/s host",
        args.card_gb,
        usable,
        args.pcie,
        args.device_gbps,
        args.host_gbps,
        args.cores,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--machines", nargs="*", default=list(MACHINES), choices=list(MACHINES))
    ap.add_argument("--card-gb", type=int, help="describe a machine instead: card memory")
    ap.add_argument("--pcie", type=int, default=4, choices=[3, 4, 5])
    ap.add_argument("--host-gbps", type=float, default=50.0, help="host RAM bandwidth")
    ap.add_argument("--device-gbps", type=float, default=360.0, help="card memory bandwidth")
    ap.add_argument("--cores", type=int, default=8)
    ap.add_argument("--efficiency", type=float, help="CPU kernel GB/s over RAM GB/s")
    ap.add_argument("--slots", type=int, nargs="*", default=[2, 3, 4, 6, 8])
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--tokens", type=int, help="replay only the first N tokens")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_hybrid.json")
    args = ap.parse_args()

    trace, layers, _ = read_trace(args.trace)
    tokens = [t for prompt in trace.values() for t in prompt][: args.tokens]
    if args.efficiency is None:
        kernel, read, efficiency = cpu_efficiency()
        print(
            f"this machine: localmix's CPU expert kernel {kernel:.1f} GB/s, plain read "
            f"{read:.1f} GB/s ({torch.get_num_threads()} threads): efficiency {efficiency:.2f}"
        )
    else:
        efficiency = args.efficiency
        print(f"CPU kernel efficiency given: {efficiency:.2f}")
    print(f"trace: {args.trace.name}, {len(tokens)} tokens x {layers} layers, prefetch off\n")
    specs = [custom_machine(args)] if args.card_gb else [MACHINES[m] for m in args.machines]
    cfg = ModelConfig.from_dict(MIXTRAL_8X7B)
    results = {"efficiency": efficiency, "trace": str(args.trace), "machines": []}
    for spec in specs:
        machine = Machine(int(spec.usable_gib * GiB), 128 * GiB)
        speeds = spec.speeds(efficiency)
        print(f"{spec.name}: {speeds.describe()}")
        row = {"machine": spec.name, "modes": {}, "slots": {}}
        plans = {
            m: plan_for(cfg, DEFAULTS, None, "cuda", 4096, machine=machine, mode=m) for m in MODES
        }
        for mode, plan in plans.items():
            p = simulate(
                tokens, plan.slots, plan.expert_bytes, speeds.with_trunk(plan.trunk, layers), mode
            )
            row["modes"][mode] = p.to_dict()
            print(
                f"  {mode:>6}: {p.tokens_per_s:5.2f} tok/s  ({p.slots_per_layer:.2f} slots/layer, "
                f"hit rate {p.hit_rate:.3f}, {p.on_cpu_per_token:4.1f} experts on the CPU and "
                f"{p.copies_per_token:4.1f} copies per token)"
            )
        gpu, hybrid = row["modes"]["gpu"]["tokens_per_s"], row["modes"]["hybrid"]["tokens_per_s"]
        print(f"  hybrid / gpu: {hybrid / gpu:.2f}x")
        trunk = speeds.with_trunk(plans["gpu"].trunk, layers)
        line = []
        for n in args.slots:
            slots = [n] * layers
            g = simulate(tokens, slots, plans["gpu"].expert_bytes, trunk, "gpu")
            h = simulate(tokens, slots, plans["gpu"].expert_bytes, trunk, "hybrid")
            row["slots"][n] = {"gpu": g.tokens_per_s, "hybrid": h.tokens_per_s}
            line.append(f"{n}: {g.tokens_per_s:.1f} / {h.tokens_per_s:.1f}")
        print("  slots per layer, gpu / hybrid tok/s (memory aside): " + ", ".join(line) + "\n")
        results["machines"].append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"raw figures: {args.out}")


if __name__ == "__main__":
    main()
