"""Decode and prefill speed of localmix against transformers on the "mini" Mixtral, same run.

    python benchmarks/bench_runtime.py [--prompt 128] [--tokens 32] [--dir /tmp/localmix-bench]

Both engines load the same random bf16 checkpoint (hidden 1024, 8 layers, 8 experts, top-2,
vocab 32000, ~0.8B parameters) and decode greedily. Prints tokens/s and localmix's ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import localmix  # noqa: E402
from benchmarks.common import mini_checkpoint  # noqa: E402


def bench_localmix(path: Path, prompt: list[int], tokens: int, repeats: int, **load_options):
    engine = localmix.load(path, device="cpu", **load_options)
    best = None
    for _ in range(repeats):
        engine.reset()
        s = engine.complete(prompt, temperature=0, max_tokens=tokens)
        if best is None or s.decode_tokens_per_s > best[1]:
            best = (s.prefill_tokens_per_s, s.decode_tokens_per_s)
    return best


def bench_transformers(path: Path, prompt: list[int], tokens: int, repeats: int):
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt])
    best = None
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t_prefill = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            t_all = time.perf_counter() - t
            result = (len(prompt) / t_prefill, (tokens - 1) / max(t_all - t_prefill, 1e-9))
            if best is None or result[1] > best[1]:
                best = result
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/localmix-bench"))
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()
    path = mini_checkpoint(args.dir)
    prompt = list(range(3, 3 + args.prompt))
    print(
        f"mini Mixtral, bf16, CPU, {torch.get_num_threads()} threads; prompt {args.prompt}, "
        f"decode {args.tokens} tokens, best of {args.repeats}"
    )
    rows = [("localmix bf16", *bench_localmix(path, prompt, args.tokens, args.repeats))]
    if not args.no_transformers:
        rows.append(
            ("transformers bf16", *bench_transformers(path, prompt, args.tokens, args.repeats))
        )
    print(f"{'engine':<20}{'prefill tok/s':>15}{'decode tok/s':>15}")
    for name, p, d in rows:
        print(f"{name:<20}{p:>15.1f}{d:>15.1f}")
    if len(rows) > 1:
        print(
            f"localmix / transformers: prefill {rows[0][1] / rows[1][1]:.2f}x, "
            f"decode {rows[0][2] / rows[1][2]:.2f}x"
        )


if __name__ == "__main__":
    main()
