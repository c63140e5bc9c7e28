"""Reading safetensors files as memory-mapped tensors, with every inconsistency a clear error.

localmix loads only safetensors: the format holds raw tensor bytes and a JSON header, so
opening a file from the internet can never run code (as unpickling a `.bin` can).
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .quant.safetensors_write import write_file

__all__ = ["SafetensorsFile", "TensorInfo", "read_header", "write_file"]

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The gate for a safetensors file: its header parsed into checked tensor infos and the
    metadata dict, or a CheckpointError that names the file and what is wrong.

    Every tensor has a known dtype, a shape of non-negative ints, and offsets that hold exactly
    its bytes, inside the file, overlapping no other tensor's. A file shorter than its header
    promises (an interrupted download) is refused here, before any tensor is read.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header (header of {n} bytes, "
                    f"file of {size}); delete the file and download it again"
                )
            raw = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    except RecursionError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (nested too deep)") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = raw.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header ('__metadata__')")
    base = 8 + n
    infos = {name: _tensor_info(path, name, entry, base, size) for name, entry in raw.items()}
    end = base
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start < end and info.nbytes:
            raise CheckpointError(f"{path}: tensor '{info.name}' overlaps another tensor's bytes")
        end = max(end, info.end)
    return infos, meta


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(path: Path, name: str, entry: object, base: int, size: int) -> TensorInfo:
    """One header entry, checked; `base` is where the data starts, `size` the file's size."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor '{name}' has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise CheckpointError(f"{path}: tensor '{name}' has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise CheckpointError(f"{path}: tensor '{name}' has malformed offsets {offsets!r}")
    start, end = offsets
    numel = 1
    for s in shape:
        numel *= s
    if end < start or end - start != numel * DTYPES[dtype].itemsize:
        raise CheckpointError(
            f"{path}: tensor '{name}' has inconsistent offsets ({end - start} bytes for "
            f"{dtype} of shape {shape})"
        )
    if base + end > size:
        raise CheckpointError(
            f"{path}: truncated: tensor '{name}' ends at byte {base + end} but the file has "
            f"{size} bytes; delete the file and download it again"
        )
    return TensorInfo(name, DTYPES[dtype], tuple(shape), base + start, base + end)


class SafetensorsFile:
    """A safetensors file mapped into memory; tensors are views of the mapping (no copy).

    Pages are private copy-on-write, so nothing written to a tensor reaches the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.infos, self.metadata = read_header(self.path)
        self._mmap: mmap.mmap | None = None

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mmap

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(
            self._map(), dtype=torch.uint8, count=info.nbytes, offset=info.start
        )
        if info.start % info.dtype.itemsize:  # unaligned for its dtype: copy out of the map
            flat = flat.clone()
        return flat.view(info.dtype).view(info.shape)
