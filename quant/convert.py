"""The offline converter: a Hugging Face Mixtral checkpoint -> localmix's quantized layout.

Reads the source tensor by tensor (memory stays near one expert's weights plus one output
shard), writes one output shard per source shard with each expert's quantized tensors adjacent
(so the offloader moves an expert in one copy), then a manifest (`localmix.json`) with the
format version, the settings, the source files' sizes and hashes, and per-tensor errors.

Atomic and resumable: a shard is written under a temporary name and renamed when complete, and
its hash recorded in `.localmix-progress.json`; a rerun skips shards whose hash still matches.
The manifest, written last, marks the output complete. The source is only ever read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .formats import DEFAULT_METHOD, QuantError, quantize_tensor
from .safetensors_write import write_file

# 2: quantized tensors padded so that any shape can be stored (quant.formats); a version-1
# model is a version-2 model whose shapes needed no padding, and is read as it is.
FORMAT_VERSION = 2
MANIFEST = "localmix.json"
PROGRESS = ".localmix-progress.json"
INDEX = "model.safetensors.index.json"
LAYOUT = "localmix-tiled32-padded"  # see quant.formats; the same bytes on every machine
SHAPES_KEY = "localmix.shapes"  # shard metadata: logical (out, in) of each quantized tensor
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
)
EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe\.experts\.\d+)\.(w[123])\.weight$")
ATTN_RE = re.compile(r"^model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight$")
HEAD_RE = re.compile(r"^lm_head\.weight$")
OUTPUT_RATIO = 0.35  # quantized output / bf16 source, with margin (4.5 of 16 bits for experts)


class ConvertError(QuantError):
    """A conversion that cannot go ahead: bad source, foreign destination, no disk space."""


@dataclass(frozen=True)
class Settings:
    """What the converter does to each kind of tensor; written into the manifest."""

    group_size: int = 64
    method: str = DEFAULT_METHOD
    attn: str = "bf16"  # "bf16" or "int8": attention projections
    head: str = "bf16"  # "bf16" or "int8": the output head

    def to_dict(self) -> dict:
        return {
            "bits": 4,
            "group_size": self.group_size,
            "method": self.method,
            "layout": LAYOUT,
            "scale_dtype": "bfloat16",
            "attn": self.attn,
            "lm_head": self.head,
            "experts": "int4",
            "router": "16-bit",
            "embeddings": "16-bit",
            "norms": "16-bit",
        }


def plan_bits(name: str, settings: Settings) -> int:
    """4 for expert weights, 8 for attention or head when asked, 0 (kept 16-bit) otherwise."""
    if EXPERT_RE.match(name):
        return 4
    if ATTN_RE.match(name) and settings.attn == "int8":
        return 8
    if HEAD_RE.match(name) and settings.head == "int8":
        return 8
    return 0


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_weight_map(src: Path) -> dict[str, str]:
    index = src / INDEX
    if index.exists():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (OSError, ValueError, KeyError) as e:
            raise ConvertError(f"{index}: unreadable index ({e})") from e
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{src}: no *.safetensors files to convert")
    out = {}
    for f in files:
        for name in open_source(f).keys():
            out[name] = f.name
    return out


def open_source(path: Path):
    if not path.exists():
        raise ConvertError(f"{path}: missing source shard; download the model again")
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise ConvertError(f"{path}: corrupt or truncated safetensors file ({e})") from e


def fingerprint(src: Path, shards: list[str], settings: Settings) -> dict:
    """What identifies a conversion: the source's config and files, and the settings."""
    config = (src / "config.json").read_bytes() if (src / "config.json").exists() else b""
    return {
        "config_sha256": hashlib.sha256(config).hexdigest(),
        "source_files": {s: (src / s).stat().st_size for s in shards},
        "settings": settings.to_dict(),
    }


def check_destination(dst: Path, fp: dict) -> dict:
    """Progress of an earlier run for the same conversion, or {}; refuse a foreign directory."""
    if not dst.exists() or not any(dst.iterdir()):
        return {}
    for marker in (PROGRESS, MANIFEST):
        path = dst / marker
        if path.exists():
            try:
                record = json.loads(path.read_text())
            except ValueError:
                continue
            if record.get("fingerprint") == fp:
                return record
            raise ConvertError(
                f"{dst} holds a different model or settings; choose another destination "
                "or delete it first"
            )
    raise ConvertError(
        f"{dst} is not empty and is not a localmix conversion; refusing to write there"
    )


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def check_free_space(dst: Path, needed: int) -> None:
    probe = dst
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ConvertError(
            f"not enough disk space in {probe}: the quantized model needs about "
            f"{needed / 1e9:.1f} GB, {free / 1e9:.1f} GB are free"
        )


def convert(
    src: str | Path,
    dst: str | Path,
    settings: Settings = Settings(),
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Quantize the checkpoint in `src` into `dst`; returns the manifest.

    `progress(done_bytes, total_bytes, what)` is called as source bytes are processed.
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ConvertError("the destination must differ from the source")
    if not (src / "config.json").exists():
        raise ConvertError(f"{src}: no config.json; is this a model directory?")
    weight_map = source_weight_map(src)
    shards = sorted(set(weight_map.values()))
    for s in shards:
        open_source(src / s)  # a missing or truncated shard fails here, before any writing
    fp = fingerprint(src, shards, settings)
    record = check_destination(dst, fp)
    if record.get("complete"):
        return json.loads((dst / MANIFEST).read_text())
    total = sum((src / s).stat().st_size for s in shards)
    check_free_space(dst, int(total * OUTPUT_RATIO))
    dst.mkdir(parents=True, exist_ok=True)
    done = record.get("shards", {})
    record = {"fingerprint": fp, "shards": done}
    write_json(dst / PROGRESS, record)

    # Each expert goes with the shard that holds its w1, so its three matrices stay together.
    owner = {}
    for name, shard in weight_map.items():
        m = EXPERT_RE.match(name)
        if m:
            owner[m.group(1)] = weight_map[f"{m.group(1)}.w1.weight"]
        else:
            owner[name] = shard
    handles = {}

    def tensor(name: str) -> torch.Tensor:
        shard = weight_map[name]
        if shard not in handles:
            handles[shard] = open_source(src / shard)
        return handles[shard].get_tensor(name)

    n_out = len(shards)
    out_names = {s: f"model-{i + 1:05d}-of-{n_out:05d}.safetensors" for i, s in enumerate(shards)}
    processed = 0
    for shard in shards:
        out_name = out_names[shard]
        keys = sorted(k for k, s in owner.items() if s == shard)
        shard_bytes = (src / shard).stat().st_size
        previous = done.get(out_name)
        if previous and (dst / out_name).exists() and sha256(dst / out_name) == previous["sha256"]:
            processed += shard_bytes
            if progress:
                progress(processed, total, f"{out_name} (already done)")
            continue
        tensors: dict[str, torch.Tensor] = {}
        errors: dict[str, float] = {}
        shapes: dict[str, list[int]] = {}
        for key in keys:
            names = (
                [f"{key}.{w}.weight" for w in ("w1", "w3", "w2")]
                if key not in weight_map
                else [key]
            )
            for name in names:
                w = tensor(name)
                bits = plan_bits(name, settings)
                if bits:
                    q = quantize_tensor(
                        w, bits=bits, group_size=settings.group_size, method=settings.method
                    )
                    base = name.removesuffix(".weight")
                    tensors[f"{base}.qweight"] = q.qweight
                    tensors[f"{base}.scales_zeros"] = q.scales_zeros
                    errors[name] = q.error
                    shapes[base] = list(q.shape)
                else:
                    tensors[name] = w.contiguous()
        source_hash = sha256(src / shard)
        tmp = dst / f".{out_name}.tmp"
        try:
            metadata = {
                "format": "pt",
                "localmix": str(FORMAT_VERSION),
                SHAPES_KEY: json.dumps(shapes, sort_keys=True),
            }
            write_file(tmp, tensors, metadata)
            os.replace(tmp, dst / out_name)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise ConvertError(
                    f"disk full while writing {dst / out_name}; free some space and run the "
                    "same command again: finished shards are kept"
                ) from e
            raise
        done[out_name] = {
            "sha256": sha256(dst / out_name),
            "size": (dst / out_name).stat().st_size,
            "source": shard,
            "source_sha256": source_hash,
            "source_size": shard_bytes,
            "errors": errors,
            "tensors": sorted(tensors),
        }
        write_json(dst / PROGRESS, record)
        processed += shard_bytes
        if progress:
            progress(processed, total, out_name)

    for name in COPIED_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    errors = {k: v for d in done.values() for k, v in d["errors"].items()}
    expert_errors = [v for k, v in errors.items() if EXPERT_RE.match(k)]
    manifest = {
        "format": "localmix",
        "format_version": FORMAT_VERSION,
        "quantization": settings.to_dict(),
        "fingerprint": fp,
        "source": {
            "path": str(src),
            "files": {
                d["source"]: {"size": d["source_size"], "sha256": d["source_sha256"]}
                for d in done.values()
            },
        },
        "shards": {n: {"size": d["size"], "sha256": d["sha256"]} for n, d in sorted(done.items())},
        "error_summary": {
            "expert_mean_relative_error": sum(expert_errors) / max(len(expert_errors), 1),
            "expert_worst_relative_error": max(expert_errors, default=0.0),
            "tensors": len(errors),
        },
        "errors": errors,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    index = {
        "metadata": {"format": "localmix"},
        "weight_map": {t: n for n, d in sorted(done.items()) for t in d["tensors"]},
    }
    write_json(dst / INDEX, index)
    write_json(dst / MANIFEST, manifest)
    record["complete"] = True
    write_json(dst / PROGRESS, record)
    return manifest
