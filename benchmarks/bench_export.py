"""What `localmix export` costs nano: KL divergence from the bf16 model, before and after.

    python -m benchmarks.bench_export [--dir /tmp/localmix-bench] [--tokens N]

For groups of 32, 64 and 128 (the default method), the mean KL divergence of the next-token
distribution from the bf16 model's over nano's held-out text, and the held-out perplexity, of:
  - localmix's 4-bit model, as localmix runs it (its own kernels);
  - localmix's 4-bit weights dequantized into a bf16 checkpoint (the same arithmetic as the next
    row, so the two differ only by the weights);
  - the exported compressed-tensors weights dequantized the same way: integer zero points, as
    vLLM reads them (tests/test_export.py checks that compressed-tensors' own dequantizer gives
    these weights bit for bit).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from localmix.quant.convert import convert
from localmix.quant.export import export, integer_zero_point
from localmix.quant.formats import QuantizedTensor
from localmix.quant.manifest import MANIFEST, SHAPES_KEY, Settings
from localmix.quant.names import EXPERT_QWEIGHT_RE, SCALES_ZEROS
from localmix.quant.safetensors_io import SINGLE_FILE, SUFFIX, SafetensorsFile, write_file

import localmix
from localmix.demo import nano_path
from localmix.evaluate import kl_divergence, perplexity


def dense_checkpoint(quantized: Path, out: Path, exported: bool) -> Path:
    """A bf16 Hugging Face checkpoint of a converted model's weights: localmix's dequantized
    experts, or the export's (integer zero points)."""
    group = json.loads((quantized / MANIFEST).read_text())["quantization"]["group_size"]
    tensors = {}
    for shard in sorted(quantized.glob(f"*{SUFFIX}")):
        f = SafetensorsFile(shard)
        shapes = json.loads(f.metadata[SHAPES_KEY])
        for name in f.keys():
            m = EXPERT_QWEIGHT_RE.match(name)
            if m:
                base = m.group(1)
                q = QuantizedTensor(
                    f.get(name),
                    f.get(base + SCALES_ZEROS),
                    tuple(shapes[base]),
                    torch.bfloat16,
                    4,
                    group,
                    "",
                )
                w = integer_zero_point(q).dequantize() if exported else q.dequantize()
                tensors[f"{base}.weight"] = w.to(torch.bfloat16)
            elif not name.endswith(SCALES_ZEROS):
                tensors[name] = f.get(name)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    write_file(out / SINGLE_FILE, tensors, {"format": "pt"})
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(quantized / name, out / name)
    return out


def spread(ids: list[int], tokens: int, chunk: int = 256) -> list[int]:
    """About `tokens` of `ids` as evenly spaced whole chunks (the chunks the evaluation takes),
    so that a subset samples the whole held-out text, not only its start."""
    chunks = [ids[i : i + chunk] for i in range(0, len(ids) - chunk + 1, chunk)]
    take = max(1, min(len(chunks), tokens // chunk))
    step = len(chunks) / take
    return [t for i in range(take) for t in chunks[int(i * step)]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/localmix-bench"))
    ap.add_argument(
        "--tokens",
        type=int,
        default=0,
        help="held-out tokens to use, as evenly spaced chunks of 256 (0: all)",
    )
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    ref = localmix.load(nano_path(), device="cpu")
    ids = ref.tokenizer.encode((nano_path() / "heldout.txt").read_text(), bos=True)
    ids = spread(ids, args.tokens) if args.tokens else ids
    print(
        f"nano, {len(ids)} held-out tokens: KL divergence from bf16 (x 1e-3), perplexity",
        flush=True,
    )
    print(
        f"   bf16                                      ppl {perplexity(ref, ids):8.3f}", flush=True
    )
    for group in (32, 64, 128):
        quantized = args.dir / f"nano-q4-g{group}"
        convert(nano_path(), quantized, Settings(group_size=group))  # resumed if done
        exported = args.dir / f"nano-q4-g{group}-compressed-tensors"
        shutil.rmtree(exported, ignore_errors=True)
        record = export(quantized, exported)
        rows = {
            "localmix 4-bit (its kernels)": quantized,
            "localmix 4-bit, dequantized": dense_checkpoint(
                quantized, args.dir / f"nano-g{group}-dense", exported=False
            ),
            "exported, dequantized": dense_checkpoint(
                quantized, args.dir / f"nano-g{group}-export-dense", exported=True
            ),
        }
        change = record["expert_change"]["mean_relative"]
        print(f"g{group}: the export moves the experts by {change:.4f} of their norm", flush=True)
        for label, path in rows.items():
            engine = localmix.load(path, device="cpu")
            kl = kl_divergence(engine, ref, ids) * 1e3
            ppl = perplexity(engine, ids)
            print(f"   {label:<38} KL {kl:6.3f}   ppl {ppl:8.3f}", flush=True)


if __name__ == "__main__":
    main()
