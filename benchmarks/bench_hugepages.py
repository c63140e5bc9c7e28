"""Decode speed with the weights and the KV cache on huge pages (localmix's default on Linux)
against the file mapping's and malloc's 4 KiB pages, in one process.

    python -m benchmarks.bench_hugepages [--model PATH] [--rounds 8] [--long-rounds 3]

Two engines of the same checkpoint (by default the quantized mini of bench_runtime, made under
`--dir` when missing): `mmap=False` (weights read into huge pages, KV cache on huge pages: the
default where huge pages are supported and the copy fits) and `mmap=True` with its KV cache
moved to plain memory (the previous path). Every round decodes
`--tokens` tokens greedily on each in turn, after a 128-token prompt, and `--long-rounds` rounds
after a 3000-token one. Prints the medians and the huge-page engine's ratio to the other.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from localmix.quant.manifest import Settings

import localmix
from localmix import hugepages

from .bench_runtime import quantized_mini

LONG = 3000


def decode(engine: localmix.Engine, plain_cache: bool, prompt: list[int], tokens: int) -> float:
    engine.reset()
    if plain_cache:  # what RollingKVCache allocated before: torch.zeros, 4 KiB pages
        cache = engine.cache
        cache.k, cache.v = torch.zeros_like(cache.k), torch.zeros_like(cache.v)
    return engine.complete(prompt, temperature=0, max_tokens=tokens + 1).decode_tokens_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/localmix-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--long-rounds", type=int, default=3)
    args = ap.parse_args()
    if not hugepages.supported():
        raise SystemExit("transparent huge pages are not available here: nothing to compare")
    torch.set_num_threads(args.threads)
    path = args.model or quantized_mini(args.dir, "mini-q4-int8-int8", Settings())
    engines = {
        "huge pages (mmap=False)": (localmix.load(path, device="cpu", mmap=False), False),
        "file mapping, 4 KiB pages": (localmix.load(path, device="cpu", mmap=True), True),
    }
    short, long = list(range(3, 3 + 128)), list(range(3, 3 + LONG))
    rates: dict[str, dict[str, list[float]]] = {n: {"128": [], "3000": []} for n in engines}
    for r in range(max(args.rounds, args.long_rounds)):  # every engine once per round, in turn
        for name, (engine, plain) in engines.items():
            if r < args.rounds:
                rates[name]["128"].append(decode(engine, plain, short, args.tokens))
            if r < args.long_rounds:
                rates[name]["3000"].append(decode(engine, plain, long, args.tokens))
    print(
        f"{path.name}, {args.threads} threads: decode tokens/s, median of interleaved rounds "
        f"({args.rounds} at position 128, {args.long_rounds} at {LONG})"
    )
    print(f"{'weights and KV cache':<30}{'pos 128':>10}{'pos 3000':>10}")
    medians = {n: {p: statistics.median(v) for p, v in r.items()} for n, r in rates.items()}
    for name, m in medians.items():
        print(f"{name:<30}{m['128']:>10.1f}{m['3000']:>10.1f}")
    (huge, base) = medians.values()
    print(
        f"ratio: {huge['128'] / base['128']:.2f}x at 128, {huge['3000'] / base['3000']:.2f}x at 3000"
    )


if __name__ == "__main__":
    main()
