"""Expert offloading: bookkeeping overhead on the CPU, and what to expect for Mixtral on a GPU.

    python -m benchmarks.bench_offload [--dir /tmp/localmix-bench] [--trace PATH]

1. The "mini" Mixtral, 4-bit experts, decoded on the CPU by the plain engine and by the
   offloaded engine with every expert resident (slots = experts: pure bookkeeping overhead),
   then with fewer slots (hit rates, loads per token), in the same run.
2. Mixtral-8x7B at 4-bit g64: the placement plan on 12, 16 and 24 GB cards, the expert bytes
   per token those slots move on the real routing trace (transition policy, prefetch off and
   on), and the decode speed that PCIe 3.0 and 4.0 x16 links allow for those transfers alone.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from localmix.quant.convert import Settings, convert
from localmix.quant.manifest import MANIFEST

import localmix
from benchmarks.common import mini_checkpoint
from localmix.config import MIXTRAL_8X7B, ModelConfig
from localmix.offload import Machine, plan_for
from localmix.trace import read_trace, replay
from localmix.units import GiB

PCIE = {"PCIe 3.0 x16": 12e9, "PCIe 4.0 x16": 24e9}  # effective host-to-device bytes/s
CARD_FREE_GIB = {12: 11.76, 16: 15.6, 24: 23.65}  # free to CUDA on an idle 12/16/24 GB card
TRACE = Path(__file__).resolve().parents[1] / "tests" / "data" / "humaneval_2_routing.jsonl"


def decode(engine, repeats: int = 3) -> float:
    best = 0.0
    for _ in range(repeats):
        engine.reset()
        s = engine.complete(list(range(3, 67)), temperature=0, max_tokens=32)
        best = max(best, s.decode_tokens_per_s)
    return best


def overhead_on_cpu(root: Path) -> None:
    src = mini_checkpoint(root)
    q = root / "mini-q4"
    if not (q / MANIFEST).exists():
        shutil.rmtree(q, ignore_errors=True)
        convert(src, q, Settings(method="rtn"))
    print("1. mini Mixtral, 4-bit experts, CPU decode (best of 3, 32 tokens)")
    plain = decode(localmix.load(q, device="cpu"))
    print(f"   plain engine                      {plain:6.1f} tok/s")
    for slots, prefetch in ((8, 0), (8, 1), (4, 0), (4, 1), (2, 1)):
        e = localmix.load(q, device="cpu", expert_slots=slots, prefetch=prefetch)
        speed = decode(e)
        stats = e.stats()
        assert stats is not None  # loaded with expert slots: offloaded
        s = stats.summary
        print(
            f"   offloaded, {slots} slots, prefetch {prefetch}   {speed:6.1f} tok/s "
            f"({speed / plain:.0%} of plain)   hit rate {s.hit_rate:.3f}, "
            f"{s.loads_per_token:.2f} loads/token"
        )


def mixtral_on_gpus(trace_path: Path) -> None:
    cfg = ModelConfig.from_dict(MIXTRAL_8X7B)
    q = {"bits": 4, "group_size": 64, "method": "mse", "attn": "bf16", "lm_head": "bf16"}
    trace, layers, _ = read_trace(trace_path)
    print("2. Mixtral-8x7B, 4-bit g64 experts, bf16 trunk, 4096-token context")
    print(
        f"   {'card':<6}{'slots/layer':<13}{'prefetch':<10}{'hit rate':>9}{'MB/token':>10}"
        + "".join(f"{k + ' tok/s':>20}" for k in PCIE)
    )
    for gb in (12, 16, 24):
        free = CARD_FREE_GIB[gb] * GiB  # what CUDA has free on such a card once started
        plan = plan_for(cfg, q, None, "cuda", 4096, machine=Machine(int(free), None))
        for prefetch in (None, "cross-layer"):
            r = replay(trace, layers, plan.slots, "transition", prefetch, plan.expert_bytes)
            speeds = "".join(f"{bw / r.bytes_per_token:>20.1f}" for bw in PCIE.values())
            print(
                f"   {gb:<3}GB {min(plan.slots)}-{max(plan.slots):<11}{prefetch or 'off':<10}"
                f"{r.hit_rate:>9.3f}{r.bytes_per_token / 1e6:>10.0f}{speeds}"
            )
    print("   (transfer-bound speeds; mixtral-offloading reports 2.3 tok/s on an RTX 3060 12GB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/localmix-bench"))
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--skip-cpu", action="store_true")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if not args.skip_cpu:
        overhead_on_cpu(args.dir)
    mixtral_on_gpus(args.trace)


if __name__ == "__main__":
    main()
