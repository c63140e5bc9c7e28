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
    """Parse and check a safetensors header: returns tensor infos and the metadata dict.

    A file shorter than its header promises (an interrupted download) is refused here, before
    any tensor is read.
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
            raw = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    meta = raw.pop("__metadata__", None) or {}
    base = 8 + n
    infos = {}
    for name, d in raw.items():
        try:
            dtype = DTYPES[d["dtype"]]
            start, end = d["data_offsets"]
            shape = tuple(int(s) for s in d["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry") from e
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * dtype.itemsize or start < 0:
            raise CheckpointError(f"{path}: tensor '{name}' has inconsistent offsets")
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor '{name}' ends at byte {base + end} but the file has "
                f"{size} bytes; delete the file and download it again"
            )
        infos[name] = TensorInfo(name, dtype, shape, base + start, base + end)
    return infos, meta


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

    def read_bytes(self, name: str) -> bytes:
        info = self.infos[name]
        return bytes(self._map()[info.start : info.end])
