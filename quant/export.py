"""Export a model localmix quantized to a checkpoint format that vLLM serves on many GPUs.

One format: "compressed-tensors", its `pack-quantized` layout with asymmetric int4 weights, the
one vLLM's fused-MoE path loads for 4-bit grouped experts with 16-bit scales and zero points
(`CompressedTensorsWNA16MarlinMoEMethod` in vLLM's
`model_executor/layers/quantization/compressed_tensors/compressed_tensors_moe/`; asymmetric since
vLLM PR #44025, merged 2026-05-29, before which it asserted "Only symmetric quantization is
supported for MoE"). Tensor and expert parallelism are vLLM's: it shards these tensors itself.

What is written:

- each expert matrix `model.layers.{i}.block_sparse_moe.experts.{j}.w{1,2,3}` (out, in) as
  `.weight_packed` int32 (out, in / 8): eight unsigned codes per word, column 8c+e in bits
  4e..4e+3; `.weight_scale` bfloat16 (out, in / group); `.weight_zero_point` int32
  (out / 8, in / group): the integer zero points packed the same way down the rows; and
  `.weight_shape` int64 [out, in]. A weight is `(code - zero_point) * scale`;
- every other tensor as localmix keeps it, in 16 bits;
- `config.json` with a `quantization_config` that targets every linear layer but the attention,
  the router and the output head, which stay 16-bit;
- the tokenizer files, and a `tokenizer_config.json` naming the SentencePiece model's own
  special tokens where the model had none (transformers' AutoTokenizer, which vLLM uses, reads
  the directory as localmix does);
- `localmix-export.json`: the source, its settings, and how far the expert weights moved.

What changes: compressed-tensors, like AWQ and GPTQ, holds an integer zero point, the code that
stands for 0.0. localmix's `zero` is a float (the value of code 8), so a group's grid
`(code - 8) * scale + zero` passes through 0.0 only by chance. Each group is moved to the
nearest grid that does (`integer_zero_point`): its zero point rounded, or else rounded the other
way with the scale and codes refitted to localmix's values, whichever is closer in squared error.
Where localmix's grid spans 0.0 (every group of nano), the root-mean-square change in a group
is at most half its scale. What that costs in the experts' error and the KL divergence from
bf16 is measured by benchmarks/bench_export.py (docs/benchmarks.md).

Only the experts are written quantized: an 8- or 4-bit attention or output head is written in
bfloat16 as it dequantizes (vLLM would take quantized attention for the experts' scheme, and
reads no quantized head from compressed-tensors checkpoints). Refused, with the reason: models
that are not localmix-quantized or not finished, and weights whose input size is not a multiple
of the group size (vLLM's kernels need whole groups).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .convert import check_free_space
from .files import read_json
from .formats import FIT_CHUNK, PARAM_DTYPE, QuantError, QuantizedTensor, unpack_int4
from .manifest import MANIFEST, PROGRESS, SHAPES_KEY, Settings, check_manifest, plan_bits
from .names import (
    EXPERT_QWEIGHT_RE,
    EXPERT_WEIGHT_RE,
    QUANTIZED_SUFFIXES,
    QWEIGHT,
    SCALES_ZEROS,
    quantized_base,
)
from .safetensors_io import (
    INDEX,
    SafetensorsError,
    SafetensorsFile,
    read_index,
    write_file,
    write_index,
)

FORMATS = ("compressed-tensors",)
RECORD = "localmix-export.json"  # what was exported, from what, and how far the weights moved
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
CODES = 16  # 4-bit codes 0..15
# Not quantized in the export: vLLM matches these against its own module names (the router is
# `block_sparse_moe.gate`, attention `self_attn.qkv_proj` / `o_proj`, the head `lm_head`).
IGNORE = ["lm_head", "re:.*self_attn.*", r"re:.*block_sparse_moe\.gate$"]


class ExportError(QuantError):
    """A model or destination the export cannot use; the message says what to do."""


@dataclass
class IntegerZero:
    """A 4-bit grouped weight with an integer zero point: `(codes - zero) * scale` per group.

    `codes` uint8 (out, in) in 0..15, `scale` bfloat16 (out, in / group_size), `zero` uint8
    (out, in / group_size) in 0..15.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) these stand for, in float32."""
        n, k = self.codes.shape
        x = self.codes.float().view(n, -1, self.group_size) - self.zero.float()[..., None]
        return (x * self.scale.float()[..., None]).view(n, k)


def localmix_parts(q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (out, in) as float32, and scale and zero (out, in / group_size) as float32, of a
    4-bit weight whose in size is a multiple of its group size, padding cut off."""
    n, k = q.shape
    codes = unpack_int4(q.qweight)[:n, :k].float()
    groups = k // q.group_size
    scale = q.scales_zeros[:groups, :n, 0].float().t()
    zero = q.scales_zeros[:groups, :n, 1].float().t()
    return codes, scale, zero


def integer_zero_point(q: QuantizedTensor) -> IntegerZero:
    """The grid with an integer zero point closest to each group of a localmix 4-bit weight.

    localmix's weight is `(c - t) * s` with `t = 8 - zero / scale` real. Candidates per group:
    (a) the same codes and scale with `t` rounded; (b) for `floor(t)` and `ceil(t)`, the scale
    refitted by least squares to localmix's values and the codes rounded again, twice. The one
    with the smallest squared difference from localmix's dequantized weight wins; scales are
    bfloat16 like localmix's.
    """
    if q.bits != 4:
        raise ExportError(f"only 4-bit weights get an integer zero point, not {q.bits}-bit")
    n, k = q.shape
    g = q.group_size
    if k % g:
        raise ExportError(
            f"a weight of {k} input columns is not whole groups of {g}; vLLM's kernels need "
            "whole groups (quantize with a group size that divides it)"
        )
    codes, scale, zero = localmix_parts(q)
    out_codes = torch.empty(n, k, dtype=torch.uint8)
    out_scale = torch.empty(n, k // g, dtype=PARAM_DTYPE)
    out_zero = torch.empty(n, k // g, dtype=torch.uint8)
    rows = max(1, FIT_CHUNK * g // k)  # about FIT_CHUNK groups at a time, as the quantizer
    for r in range(0, n, rows):
        m = min(rows, n - r)
        c = codes[r : r + m].reshape(-1, g).long()  # (groups, g)
        # A group's weights take at most 16 values, one per code: the fit works on those
        # values and how often each occurs, not on every weight.
        counts = torch.zeros(c.shape[0], CODES).scatter_add_(1, c, torch.ones(c.shape))
        table, s_new, t_new = _fit_integer_zero(
            counts, scale[r : r + m].reshape(-1, 1), zero[r : r + m].reshape(-1, 1)
        )
        out_codes[r : r + m] = table.gather(1, c).to(torch.uint8).view(m, k)
        out_scale[r : r + m] = s_new.to(PARAM_DTYPE).view(m, -1)
        out_zero[r : r + m] = t_new.to(torch.uint8).view(m, -1)
    return IntegerZero(out_codes, out_scale, out_zero, g)


def _fit_integer_zero(
    counts: torch.Tensor, s: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For localmix's groups `(c - 8) * s + z`, given how many weights of each group hold each
    code c (`counts`, (groups, 16)) and s, z (groups, 1): the new code of each old one
    (groups, 16), the scale and the integer zero point (groups, 1), all float32."""
    c = torch.arange(CODES, dtype=torch.float32).expand_as(counts)
    v = (c - 8) * s + z  # (groups, 16): localmix's weight for each code, as it dequantizes it
    live = s > 0  # a zero scale is a padded or all-zero row: it stays exactly 0
    t = torch.where(live, 8 - z / torch.where(live, s, torch.ones_like(s)), torch.full_like(s, 8))

    def bf16(x: torch.Tensor) -> torch.Tensor:
        return x.to(PARAM_DTYPE).float()

    def total(x: torch.Tensor) -> torch.Tensor:  # over a group's weights
        return (counts * x).sum(-1, keepdim=True)

    def error(u: torch.Tensor, s_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        return total(((u - t_) * s_ - v) ** 2)

    # (a) localmix's codes and scale, the zero point rounded
    best_t = t.round().clamp(0, CODES - 1)
    best_u, best_s = c, s
    best_err = error(best_u, best_s, best_t)
    for t_int in (t.floor().clamp(0, CODES - 1), t.ceil().clamp(0, CODES - 1)):
        u = c
        s_fit = s
        for _ in range(2):  # (b) scale refitted for the codes, codes rounded again
            x = u - t_int
            denom = total(x * x)
            s_fit = torch.where(denom > 0, total(v * x) / denom.clamp(min=1), s)
            s_fit = bf16(torch.where(s_fit > 0, s_fit, s))
            u = (torch.round(v / s_fit.clamp(min=1e-30)) + t_int).clamp(0, CODES - 1)
        err = error(u, s_fit, t_int)
        better = (err < best_err) & live
        best_u = torch.where(better, u, best_u)
        best_s = torch.where(better, s_fit, best_s)
        best_t = torch.where(better, t_int, best_t)
        best_err = torch.where(better, err, best_err)
    best_t = torch.where(live, best_t, torch.full_like(best_t, 8))
    best_u = torch.where(live, best_u, torch.full_like(best_u, 8))
    return best_u, best_s, best_t


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-bit values (rows, cols) -> int32 (rows, ceil(cols * bits / 32)), as
    compressed-tensors packs them: value e of each run of 32 / bits in bits e*bits and up of
    one word, columns padded with zeros to whole words."""
    per_word = 32 // bits
    rows, cols = values.shape
    v = values.to(torch.int64)
    if cols % per_word:
        v = torch.nn.functional.pad(v, (0, per_word - cols % per_word))
    v = v.view(rows, -1, per_word)  # (rows, words, values per word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (v << shifts).sum(-1)  # 0 .. 2^32 - 1
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same bits as int32
    return words.to(torch.int32)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A row-major copy (`.contiguous()` keeps odd strides on dimensions of size 1)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def compressed_tensors_config(group_size: int) -> dict:
    """config.json's `quantization_config`: 4-bit asymmetric groups on every linear layer but
    those in IGNORE, stored packed."""
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": False,
        "strategy": "group",
        "group_size": group_size,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": list(IGNORE),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def export_tensors(q: QuantizedTensor, base: str) -> tuple[dict[str, torch.Tensor], float]:
    """The compressed-tensors tensors of one expert matrix, and the relative Frobenius change
    of its dequantized weight from localmix's."""
    iz = integer_zero_point(q)
    n, k = q.shape
    codes, scale, zero = localmix_parts(q)
    ours = ((codes.view(n, -1, q.group_size) - 8) * scale[..., None] + zero[..., None]).view(n, k)
    change = float(torch.linalg.norm(iz.dequantize() - ours) / torch.linalg.norm(ours).clamp(1e-30))
    tensors = {
        f"{base}.weight_packed": pack_int32(iz.codes, 4),
        f"{base}.weight_scale": iz.scale.contiguous(),
        f"{base}.weight_zero_point": _dense(pack_int32(iz.zero.t(), 4).t()),  # packed down rows
        f"{base}.weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    return tensors, change


def check_source(model_dir: Path) -> dict:
    """The manifest of a finished localmix quantization that the export can write, or an
    ExportError saying why not."""
    if not (model_dir / MANIFEST).exists():
        if (model_dir / PROGRESS).exists():
            raise ExportError(
                f"{model_dir}: an unfinished quantization; run the same `localmix quantize` "
                "command again to complete it, then export"
            )
        raise ExportError(
            f"{model_dir}: not a localmix-quantized model (no {MANIFEST}); quantize it first "
            "with `localmix quantize SRC DST`"
        )
    manifest = check_manifest(read_json(model_dir / MANIFEST), model_dir / MANIFEST)
    if not (model_dir / "config.json").exists():
        raise ExportError(f"{model_dir}: no config.json")
    return manifest


def check_destination(dst: Path) -> None:
    """Refuse a destination that exists and is not an empty directory."""
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise ExportError(f"{dst} exists and is not a directory; choose another destination")
    if dst.is_dir() and any(dst.iterdir()):
        raise ExportError(f"{dst} is not empty; choose another destination or delete it first")


def export(
    model_dir: str | Path,
    dst: str | Path,
    fmt: str = "compressed-tensors",
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Write the localmix-quantized model in `model_dir` to `dst` in format `fmt`; returns the
    record also written to `dst/localmix-export.json` (format, source, how far the expert
    weights moved).

    The directory appears complete or not at all: it is written beside `dst` under a hidden
    temporary name and renamed when done. `progress(done, total, shard)` follows the shards.
    """
    model_dir, dst = Path(model_dir), Path(dst)
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    manifest = check_source(model_dir)
    check_destination(dst)
    group_size = manifest["quantization"]["group_size"]
    weight_map = read_index(model_dir)
    if weight_map is None:
        raise ExportError(f"{model_dir}: no {INDEX}; quantize the model again")
    config = read_json(model_dir / "config.json")
    if not isinstance(config, dict):
        raise ExportError(f"{model_dir / 'config.json'}: not a JSON object")
    # int4 codes take the same bytes packed in int32 words: the export is the source's size
    check_free_space(
        dst.parent, sum((model_dir / s).stat().st_size for s in set(weight_map.values()))
    )
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, unique, and made with the user's umask (tempfile.mkdtemp would make it 0700).
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    try:
        tmp.mkdir()
        record = _write(model_dir, tmp, config, manifest, weight_map, group_size, progress)
        check_destination(dst)  # nothing appeared there meanwhile
        if dst.is_dir():
            dst.rmdir()  # empty: replaced by the finished export
        os.replace(tmp, dst)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ExportError(f"cannot write {dst} ({e.strerror or e})") from e
        raise
    return record


def trunk_bits(qweight_name: str, settings: Settings) -> int:
    """The bits of a quantized attention projection or output head (`NAME.qweight`), 0 for
    anything else."""
    name = quantized_base(qweight_name) + ".weight"
    return 0 if EXPERT_WEIGHT_RE.match(name) else plan_bits(name, settings)


def _write(model_dir, out, config, manifest, weight_map, group_size, progress) -> dict:
    settings = Settings.of(manifest["quantization"])
    shards = sorted(set(weight_map.values()))
    out_index: dict[str, str] = {}
    changes: dict[str, float] = {}
    for done, shard in enumerate(shards):
        try:
            f = SafetensorsFile(model_dir / shard)
            shapes = json.loads(f.metadata.get(SHAPES_KEY, "{}"))
        except SafetensorsError as e:
            raise ExportError(f"{e.path}: unreadable shard ({e.reason})") from e
        except ValueError as e:
            raise ExportError(f"{model_dir / shard}: unreadable shard ({e})") from e
        tensors: dict[str, torch.Tensor] = {}
        for name in sorted(n for n in f.keys() if weight_map.get(n) == shard):
            m = EXPERT_QWEIGHT_RE.match(name)
            if m:
                base = m.group(1)
                qweight = f.get(name)
                scales_zeros = f.get(base + SCALES_ZEROS)
                shape = shapes.get(base, [qweight.shape[0], 2 * qweight.shape[1]])
                q = QuantizedTensor(
                    qweight, scales_zeros, tuple(shape), torch.bfloat16, 4, group_size, "stored"
                )
                written, changes[f"{base}.weight"] = export_tensors(q, base)
                tensors.update(written)
            elif name.endswith(QWEIGHT) and (bits := trunk_bits(name, settings)):
                # an 8- or 4-bit attention projection or head: written in bfloat16 as it
                # dequantizes (vLLM would take a quantized one for the experts' scheme, and
                # reads no quantized head from compressed-tensors checkpoints)
                base = quantized_base(name)
                scales_zeros = f.get(base + SCALES_ZEROS)
                qweight = f.get(name)
                width = qweight.shape[1] * (2 if bits == 4 else 1)
                shape = shapes.get(base, [qweight.shape[0], width])
                g = settings.group_size if bits == 4 else 0
                q = QuantizedTensor(
                    qweight, scales_zeros, tuple(shape), torch.bfloat16, bits, g, "stored"
                )
                tensors[f"{base}.weight"] = q.dequantize()
            elif name.endswith(QUANTIZED_SUFFIXES):
                qweight_name = quantized_base(name) + QWEIGHT
                if not name.endswith(SCALES_ZEROS) or not (
                    EXPERT_QWEIGHT_RE.match(qweight_name) or trunk_bits(qweight_name, settings)
                ):
                    raise ExportError(
                        f"{model_dir / shard}: quantized tensor '{name}' is not an expert, "
                        "attention or output-head weight"
                    )
            else:
                tensors[name] = f.get(name)
        write_file(
            out / shard, tensors, {"format": "pt"}
        )  # the whole directory is renamed at the end
        out_index.update({t: shard for t in tensors})
        if progress:
            progress(done + 1, len(shards), shard)
    if not changes:
        raise ExportError(f"{model_dir}: no 4-bit expert weights to export")
    write_index(out, out_index)
    config = {**config, "quantization_config": compressed_tensors_config(group_size)}
    _write_json(out / "config.json", config)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    if (out / "tokenizer.model").is_file() and not (out / "tokenizer_config.json").exists():
        _write_json(out / "tokenizer_config.json", tokenizer_config(out / "tokenizer.model"))
    values = list(changes.values())
    record = {
        "format": "compressed-tensors",
        "layout": "pack-quantized, int4 asymmetric, group size "
        f"{group_size}, bfloat16 scales, integer zero points",
        "source": {"path": str(model_dir), "quantization": manifest["quantization"]},
        "expert_change": {
            "mean_relative": sum(values) / len(values),
            "worst_relative": max(values),
            "tensors": len(values),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json(out / RECORD, record)
    return record


def tokenizer_config(path: Path) -> dict:
    """A `tokenizer_config.json` for a SentencePiece model without one, so that transformers'
    AutoTokenizer (which vLLM uses) reads it as localmix does: a Llama tokenizer whose special
    tokens are the model file's own, BOS added to each prompt."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise ExportError(f"{path}: not a SentencePiece model ({e})") from e
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()),
        "add_bos_token": True,
        "add_eos_token": False,
    }


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
