"""localmix's on-disk format, in one place: the manifest (`localmix.json`) and what it records.

A quantized model directory holds the converter's safetensors shards (quantized tensors in
localmix's own layout, `LAYOUT`, logical shapes in each shard's `SHAPES_KEY` metadata), the
files copied from the source, and the manifest, written last: the mark of a finished model,
with the format version, the quantization `Settings`, the source's files and hashes and the
per-tensor errors. An unfinished conversion has `PROGRESS` instead.

This module imports no PyTorch: `localmix list`, `show` and the store read manifests with it.
The converter (`convert.py`) writes what it describes; the loader reads it through
`read_manifest`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import QuantError
from .files import is_plain_name, read_json
from .names import ATTN_RE, EXPERT_WEIGHT_RE, HEAD_RE

# 2: quantized tensors padded so that any shape can be stored (quant.formats); a version-1
# model is a version-2 model whose shapes needed no padding, and is read as it is.
FORMAT_VERSION = 2
MANIFEST = "localmix.json"
PROGRESS = ".localmix-progress.json"  # while a conversion is unfinished
RESUME_KEY = "resume"  # the finished conversion's progress record, in its manifest
LAYOUT = "localmix-tiled32-padded"  # see quant.formats; the same bytes on every machine
SHAPES_KEY = "localmix.shapes"  # shard metadata: logical (out, in) of each quantized tensor
# Attention projections and output head: kept 16-bit, 8-bit per channel or 4-bit grouped.
TRUNK_FORMATS = {"bf16": 0, "int8": 8, "int4": 4}
# The defaults, by measurement: int8 for both costs nano little KL divergence over bf16 for a
# third fewer bytes per token, where 4-bit costs far more (benchmarks/bench_nano.py; the figures
# are in docs/benchmarks.md).
DEFAULT_ATTN = "int8"
DEFAULT_HEAD = "int8"
# A quantized model's size over its 16-bit source's, with margin (4.5 of 16 bits for experts):
# what a pull or a conversion checks the disk for before it writes anything.
QUANTIZED_SIZE_RATIO = 0.35
METHODS = ("wmse", "mse", "rtn")  # how a group's scale and zero point are chosen
DEFAULT_METHOD = "wmse"
GROUP_SIZES = (32, 64, 128)


class ConvertError(QuantError):
    """A conversion that cannot go ahead: bad source, foreign destination, no disk space."""


@dataclass(frozen=True)
class Settings:
    """What the converter does to each kind of tensor; written into the manifest."""

    group_size: int = 64
    method: str = DEFAULT_METHOD
    attn: str = DEFAULT_ATTN  # one of TRUNK_FORMATS: attention projections
    lm_head: str = DEFAULT_HEAD  # one of TRUNK_FORMATS: the output head

    @classmethod
    def of(cls, quantization: dict) -> Settings:
        """The settings a manifest's `quantization` records (a manifest from before the trunk
        could be quantized keeps it 16-bit)."""
        return cls(
            quantization.get("group_size"),  # type: ignore[arg-type]  # checked by check_settings
            quantization.get("method"),  # type: ignore[arg-type]
            quantization.get("attn", "bf16"),
            quantization.get("lm_head", "bf16"),
        )

    def to_dict(self) -> dict:
        return {
            "bits": 4,
            "group_size": self.group_size,
            "method": self.method,
            "layout": LAYOUT,
            "scale_dtype": "bfloat16",
            "attn": self.attn,
            "lm_head": self.lm_head,
            "experts": "int4",
            "router": "16-bit",
            "embeddings": "16-bit",
            "norms": "16-bit",
        }


def plan_bits(name: str, settings: Settings) -> int:
    """4 for expert weights, the bits asked for attention and head, 0 (kept 16-bit) otherwise."""
    if EXPERT_WEIGHT_RE.match(name):
        return 4
    if ATTN_RE.match(name):
        return TRUNK_FORMATS[settings.attn]
    if HEAD_RE.match(name):
        return TRUNK_FORMATS[settings.lm_head]
    return 0


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite number that converts to a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def file_record(value: object) -> bool:
    return isinstance(value, dict) and is_int(value.get("size")) and is_sha256(value.get("sha256"))


def str_map(value: object, check: Callable[[object], bool]) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and check(v) for k, v in value.items()
    )


def check_settings(settings: Settings) -> Settings:
    """Settings the converter and the loader can use, or a ConvertError saying which is off."""
    if not is_int(settings.group_size) or settings.group_size not in GROUP_SIZES:
        raise ConvertError(
            f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, "
            f"not {settings.group_size!r}"
        )
    if settings.method not in METHODS:
        raise ConvertError(f"unknown method {settings.method!r}; use one of {', '.join(METHODS)}")
    for what, value in (("attention", settings.attn), ("output head", settings.lm_head)):
        if value not in TRUNK_FORMATS:
            raise ConvertError(f"{what} weights are {', '.join(TRUNK_FORMATS)}, not {value!r}")
    return settings


def check_manifest(raw: object, path: Path) -> dict:
    """The gate for a `localmix.json`: its values checked and typed, or a ConvertError that
    names the file and what is wrong."""
    if not isinstance(raw, dict) or raw.get("format") != "localmix":
        raise ConvertError(f"{path}: not a localmix manifest")

    def bad(field: str) -> ConvertError:
        return ConvertError(f"{path}: corrupt manifest (field '{field}'); quantize the model again")

    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad("format_version")
    if version > FORMAT_VERSION:
        raise ConvertError(
            f"{path}: format version {version} is newer than this localmix reads "
            f"({FORMAT_VERSION}); upgrade localmix"
        )
    q = raw.get("quantization")
    if not isinstance(q, dict) or q.get("bits") != 4 or not isinstance(q.get("layout"), str):
        raise bad("quantization")
    try:
        settings = check_settings(Settings.of(q))
    except ConvertError as e:
        raise ConvertError(f"{path}: corrupt manifest ({e})") from e
    summary = raw.get("error_summary")
    if not (
        isinstance(summary, dict)
        and is_number(summary.get("expert_mean_relative_error"))
        and is_number(summary.get("expert_worst_relative_error"))
        and is_int(summary.get("tensors"))
    ):
        raise bad("error_summary")
    source = raw.get("source", {"path": "", "files": {}})
    if not (
        isinstance(source, dict)
        and isinstance(source.get("path"), str)
        and str_map(source.get("files"), file_record)
    ):
        raise bad("source")
    checks = {
        "fingerprint": lambda v: isinstance(v, dict),
        "shards": lambda v: str_map(v, file_record) and all(is_plain_name(n) for n in v),
        "errors": lambda v: str_map(v, is_number),
        "created": lambda v: isinstance(v, str),
    }
    defaults = {"fingerprint": {}, "shards": {}, "errors": {}, "created": ""}
    out = {"format": "localmix", "format_version": version}
    for field, check in checks.items():
        value = raw.get(field, defaults[field])
        if not check(value):
            raise bad(field)
        out[field] = value
    return {
        **out,
        "quantization": {**settings.to_dict(), "layout": q["layout"]},
        "source": source,
        "error_summary": summary,
    }


def read_manifest(model_dir: Path) -> dict | None:
    """The gate for a model directory's manifest: its values checked (`check_manifest`), None
    for a plain Hugging Face checkpoint, a ConvertError for an unfinished quantization or a
    manifest that does not pass."""
    path = model_dir / MANIFEST
    if not path.exists():
        if (model_dir / PROGRESS).exists():
            raise ConvertError(
                f"{model_dir}: an unfinished quantization; run the same `localmix quantize` "
                "command again to complete it"
            )
        return None
    return check_manifest(read_json(path), path)
