"""Safetensors files, for the converter and the runtime: reading them as memory-mapped tensors,
writing them in a fixed order, finding a checkpoint's weight map, writing a sharded one's index,
naming shards.

localmix reads only safetensors: the format holds raw tensor bytes and a JSON header, so opening
a file from the internet can never run code (as unpickling a `.bin` can). Every inconsistency of
a file is a `SafetensorsError` that names the file; the runtime turns it into its own
`CheckpointError`, the converter into a `ConvertError`.

(Here, in `quant`, because the runtime may import `quant` and not the other way round. PyTorch
is imported when a tensor or a header is first read, so the file names and the index come
without it.)
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import QuantError
from .files import is_plain_name, read_json, write_json

if TYPE_CHECKING:
    import torch

DTYPES = {  # safetensors' dtype names -> PyTorch's
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
DTYPE_NAMES = {torch_name: name for name, torch_name in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
SUFFIX = ".safetensors"
SINGLE_FILE = "model.safetensors"  # an unsharded checkpoint
INDEX = "model.safetensors.index.json"  # a sharded one's weight map
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # pickles: never read


class SafetensorsError(QuantError):
    """A safetensors file that is missing, truncated or corrupt: `path` and what is wrong."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:  # pickled as it was made
        return type(self), (self.path, self.reason)


def shard_name(i: int, n: int) -> str:
    """The Hugging Face name of shard `i` (from 1) of `n`."""
    return f"model-{i:05d}-of-{n:05d}{SUFFIX}"


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
    metadata dict, or a SafetensorsError that names the file and what is wrong.

    Every tensor has a known dtype, a shape of non-negative ints, and offsets that hold exactly
    its bytes, inside the file, overlapping no other tensor's. A file shorter than its header
    promises (an interrupted download) is refused here, before any tensor is read.
    """
    import torch

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(path, f"truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise SafetensorsError(
                    path,
                    f"corrupt or truncated safetensors header (header of {n} bytes, file of "
                    f"{size}); delete the file and download it again",
                )
            raw = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError as e:
        raise SafetensorsError(path, "file not found") from e
    except OSError as e:
        raise SafetensorsError(path, f"cannot read it ({e.strerror or e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(path, f"corrupt safetensors header ({e})") from e
    except RecursionError as e:
        raise SafetensorsError(path, "corrupt safetensors header (nested too deep)") from e
    if not isinstance(raw, dict):
        raise SafetensorsError(path, "corrupt safetensors header (not a JSON object)")
    meta = raw.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SafetensorsError(path, "corrupt safetensors header ('__metadata__')")
    base = 8 + n
    dtypes = {name: getattr(torch, t) for name, t in DTYPES.items()}
    infos = {
        name: _tensor_info(path, name, entry, base, size, dtypes) for name, entry in raw.items()
    }
    end = base
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start < end and info.nbytes:
            raise SafetensorsError(path, f"tensor '{info.name}' overlaps another tensor's bytes")
        end = max(end, info.end)
    return infos, meta


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(
    path: Path, name: str, entry: object, base: int, size: int, dtypes: dict[str, torch.dtype]
) -> TensorInfo:
    """One header entry, checked; `base` is where the data starts, `size` the file's size."""
    if not isinstance(entry, dict):
        raise SafetensorsError(path, f"tensor '{name}' has a malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(path, f"tensor '{name}' has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise SafetensorsError(path, f"tensor '{name}' has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise SafetensorsError(path, f"tensor '{name}' has malformed offsets {offsets!r}")
    start, end = offsets
    numel = 1
    for s in shape:
        numel *= s
    if end < start or end - start != numel * dtypes[dtype].itemsize:
        raise SafetensorsError(
            path,
            f"tensor '{name}' has inconsistent offsets ({end - start} bytes for {dtype} of "
            f"shape {shape})",
        )
    if base + end > size:
        raise SafetensorsError(
            path,
            f"truncated: tensor '{name}' ends at byte {base + end} but the file has {size} "
            "bytes; delete the file and download it again",
        )
    return TensorInfo(name, dtypes[dtype], tuple(shape), base + start, base + end)


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
        import torch

        info = self.infos[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(
            self._map(), dtype=torch.uint8, count=info.nbytes, offset=info.start
        )
        if info.start % info.dtype.itemsize:  # unaligned for its dtype: copy out of the map
            flat = flat.clone()
        return flat.view(info.dtype).view(info.shape)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor `name` from the file into `out` (uint8, the tensor's bytes), without
        mapping it; returns `out` viewed as the tensor."""
        import torch

        info = self.infos[name]
        if out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() != info.nbytes:
            raise ValueError(f"tensor '{name}' needs {info.nbytes} contiguous bytes to read into")
        view = out.numpy().data.cast("B")
        try:
            with open(self.path, "rb") as f:
                f.seek(info.start)
                done = 0
                while done < info.nbytes:
                    n = f.readinto(view[done:])
                    if not n:
                        raise SafetensorsError(
                            self.path,
                            f"truncated while reading tensor '{name}'; delete the file and "
                            "download it again",
                        )
                    done += n
        except OSError as e:
            raise SafetensorsError(self.path, f"could not be read ({e.strerror})") from e
        return out.view(info.dtype).view(info.shape)


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors in the safetensors layout, back to back in the order given, the same bytes
    every time.

    Order matters to callers: tensors written together stay adjacent in the file (the converter
    keeps each expert's tensors together, so the offloader moves an expert in one copy).
    `safetensors.torch.save_file` reorders tensors by dtype and its header's key order varies.
    """
    import torch

    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[str(t.dtype).removeprefix("torch.")],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def write_index(
    folder: Path, weight_map: dict[str, str], metadata: dict[str, str] | None = None
) -> None:
    """Write the `model.safetensors.index.json` of the shards in `folder` (atomically): the
    weight map (tensor name -> shard file there) sorted by name, and `metadata` with
    `total_size`, the bytes of the tensors mapped, read from the shards' headers."""
    headers = {shard: read_header(folder / shard)[0] for shard in set(weight_map.values())}
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            raise SafetensorsError(folder / shard, f"holds no tensor {name}")
    total = sum(headers[shard][name].nbytes for name, shard in weight_map.items())
    index = {
        "metadata": {**(metadata or {}), "total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_json(folder / INDEX, index)


def read_index(folder: Path) -> dict[str, str] | None:
    """The weight map of `model.safetensors.index.json` (tensor name -> shard file), checked:
    every shard is a plain file name in `folder` (a symlink there, as in the Hugging Face
    cache, is fine). None without an index."""
    path = folder / INDEX
    if not path.exists():
        return None
    raw = read_json(path)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise QuantError(f"{path}: unreadable index (no 'weight_map' of tensor names to files)")
    for tensor, shard in weight_map.items():
        if not is_plain_name(shard) or not shard.endswith(SUFFIX):
            raise QuantError(
                f"{path}: tensor '{tensor}' is put in {shard!r}, not a .safetensors file of "
                "this directory; refusing to read it"
            )
    return dict(weight_map)


def weight_map(folder: Path) -> dict[str, str]:
    """Each tensor name of the checkpoint in `folder` -> the safetensors file that holds it:
    the index's (`read_index`), or else every tensor of every `*.safetensors` there.

    A folder of pickle checkpoints only is refused with the reason.
    """
    index = read_index(folder)
    if index is not None:
        return index
    files = sorted(folder.glob(f"*{SUFFIX}"))
    if not files:
        unsafe = [p.name for p in folder.iterdir() if p.suffix in UNSAFE_SUFFIXES]
        if unsafe:
            raise QuantError(
                f"{folder}: only pickle checkpoints here ({', '.join(unsafe)}); localmix "
                "loads safetensors only, since unpickling a downloaded file can run code"
            )
        raise QuantError(f"{folder}: no *{SUFFIX} files here")
    out: dict[str, str] = {}
    for f in files:
        for name in SafetensorsFile(f).keys():
            out[name] = f.name
    return out
