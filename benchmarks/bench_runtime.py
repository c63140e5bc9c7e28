"""Decode and prefill speed of localmix against llama.cpp on the "mini" Mixtral, same run.

    python -m benchmarks.bench_runtime [--threads 2] [--tokens 64] [--repeats 3]
        [--llama-cpp-source DIR] [--dir /tmp/localmix-bench]

One random bf16 checkpoint (hidden 1024, 8 layers, 8 experts, top-2, vocab 32000, ~0.8B
parameters) is loaded by localmix as it is and quantized to 4-bit experts with 16-bit and with
8-bit attention and output head, and converted by llama.cpp's own tools to
F16, Q8_0, Q4_0 and Q4_K_M (benchmarks/llamacpp.py says how llama.cpp is found). Every system
is timed in turn, round after round: decode (`--tokens` greedy steps after a 128-token prompt)
and prefill of 128 and 512 tokens from an empty cache; localmix's default and Q4_K_M also
decode after a 3000-token prompt, for the speed lost to a long context. Prints the median of
the rounds, the weight bytes each system reads per decoded token, the memory bandwidth measured
in the same run and the speed that bandwidth allows (the roofline), then localmix's ratios to
llama.cpp.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from localmix.quant.convert import Settings, convert
from localmix.quant.manifest import MANIFEST

import localmix
from benchmarks import llamacpp
from benchmarks.common import MINI, mini_checkpoint

PROMPTS = (128, 512)
LONG = 3000  # the position of the long-context decode (item 4 of #21)
TRUNKS = ("bf16", "int8")  # attention and head formats of the 4-bit variants


def read_bandwidth(threads: int, size: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes per second PyTorch sums a float32 buffer of `size` bytes at (best of a few)."""
    torch.set_num_threads(threads)
    x = torch.ones(size // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return size / best


def localmix_bytes_per_token(engine) -> int:
    """Weight bytes a decode step reads: all but the embedding table (one row of it), and
    top_k of every n experts' matrices."""
    cfg = engine.config
    share = cfg.num_experts_per_tok / cfg.num_local_experts
    total = 0.0
    tensors = [*engine.model.named_parameters(), *engine.model.named_buffers()]
    for name, t in tensors:
        if name.startswith(("embed_tokens", "rotary")):
            continue
        total += t.numel() * t.element_size() * (share if ".experts." in name else 1)
    return int(total)


class Localmix:
    """A localmix engine timed as `llamacpp.LlamaCpp` times llama.cpp."""

    def __init__(self, path: Path):
        self.engine = localmix.load(path, device="cpu")
        self.bytes = localmix_bytes_per_token(self.engine)

    def prefill(self, ids: list[int]) -> float:
        self.engine.reset()
        return self.engine.complete(ids, temperature=0, max_tokens=1).prefill_tokens_per_s

    def decode(self, prompt: list[int], tokens: int) -> float:
        self.engine.reset()
        s = self.engine.complete(prompt, temperature=0, max_tokens=tokens + 1)
        return s.decode_tokens_per_s


def quantized_mini(root: Path, name: str, settings: Settings) -> Path:
    """The mini checkpoint converted by localmix with `settings`, once, under `root`."""
    dst = root / name
    if not (dst / MANIFEST).exists():
        convert(mini_checkpoint(root), dst, settings)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/localmix-bench"))
    ap.add_argument("--llama-cpp-source", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source = mini_checkpoint(args.dir)
    systems: dict[str, object] = {"localmix bf16": Localmix(source)}
    for trunk in TRUNKS:
        settings = Settings(attn=trunk, lm_head=trunk)
        default = " (default)" if settings == Settings() else ""
        name = f"localmix 4-bit, {trunk} attn+head{default}"
        systems[name] = Localmix(quantized_mini(args.dir, f"mini-q4-{trunk}-{trunk}", settings))
    why_not = llamacpp.unavailable_reason(args.llama_cpp_source)
    if why_not:
        print(f"llama.cpp: not measured ({why_not}); localmix alone")
    else:
        kinds = list(llamacpp.FTYPES)
        ggufs = llamacpp.convert(source, args.dir / "mini-gguf", args.llama_cpp_source, kinds)
        for kind, path in ggufs.items():
            system = llamacpp.LlamaCpp(path, args.threads, context=LONG + args.tokens + 8)
            system.bytes = llamacpp.bytes_per_token(
                path, MINI["num_experts_per_tok"], MINI["num_local_experts"]
            )
            systems[f"llama.cpp {kind}"] = system

    prompts = {n: list(range(3, 3 + n)) for n in (*PROMPTS, LONG)}
    long_context = [n for n in systems if n.endswith("(default)") or n.endswith("Q4_K_M")]
    runs: dict[str, list[tuple[float, ...]]] = {name: [] for name in systems}
    long_runs: dict[str, list[float]] = {name: [] for name in long_context}
    bandwidths = []
    for _ in range(args.repeats):  # rounds: every system once per round, in turn
        bandwidths.append(read_bandwidth(args.threads))
        for name, system in systems.items():
            decode = system.decode(prompts[128], args.tokens)
            runs[name].append((decode, *(system.prefill(prompts[n]) for n in PROMPTS)))
            if name in long_runs:
                long_runs[name].append(system.decode(prompts[LONG], args.tokens))
    bandwidth = statistics.median(bandwidths)
    medians = {n: [statistics.median(c) for c in zip(*r, strict=True)] for n, r in runs.items()}

    print(
        f"mini Mixtral on the CPU, {args.threads} threads each; decode {args.tokens} tokens "
        f"after a 128-token prompt; median of {args.repeats} interleaved rounds; memory read "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s (torch sum, same run)"
    )
    head = f"{'system':<44}{'decode':>8}{'pp128':>8}{'pp512':>8}{'MB/token':>10}{'roofline':>10}"
    print(head)
    for name, (decode, *prefill) in medians.items():
        mb = systems[name].bytes / 1e6
        cells = f"{decode:>8.1f}" + "".join(f"{p:>8.1f}" for p in prefill)
        print(f"{name:<44}{cells}{mb:>10.1f}{bandwidth / systems[name].bytes:>10.1f}")
    print("(tokens/s; roofline: the decode speed the measured bandwidth allows for those bytes)")
    for name, speeds in long_runs.items():
        at_long = statistics.median(speeds)
        loss = 1 - at_long / medians[name][0]
        print(
            f"{name}: decode at position {LONG} {at_long:.1f} tokens/s, "
            f"{loss:.0%} below position 128"
        )
    pairs = [("localmix bf16", "llama.cpp F16")]
    pairs += [(ours, "llama.cpp Q4_K_M") for ours in list(systems)[1 : 1 + len(TRUNKS)]]
    for ours, theirs in pairs:
        if theirs in medians:
            ratios = [a / b for a, b in zip(medians[ours], medians[theirs], strict=True)]
            print(
                f"{ours} / {theirs}: decode {ratios[0]:.2f}x, pp128 {ratios[1]:.2f}x, "
                f"pp512 {ratios[2]:.2f}x"
            )


if __name__ == "__main__":
    main()
