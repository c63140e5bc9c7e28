"""The one gate for load options: raw values from any face become typed, checked `LoadOptions`
before any work is done (no file read, no weight loaded), or an `OptionError` in one line."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .defaults import DEFAULT_EXPERTS
from .engine import DEFAULT_CONTEXT
from .errors import OptionError
from .expert_cache import DEFAULT_POLICY, POLICIES
from .offload import DEFAULT_PREFETCH, parse_bytes
from .sampling import SamplingOptions
from .units import gib

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


@dataclass(frozen=True)
class LoadOptions:
    """Where and how a model runs: what `localmix.load` takes, every value already checked."""

    device: torch.device
    dtype: torch.dtype | None  # None: the checkpoint's
    context: int  # the rolling KV window asked for (the model's own window may be smaller)
    sinks: int
    device_memory: int | None  # bytes; None: no budget
    expert_slots: int | None
    policy: str
    prefetch: int
    experts: str = DEFAULT_EXPERTS  # where missed experts run: auto, gpu, cpu, hybrid
    # CPU weights: True views of the files, False read into huge pages, None the latter if it fits
    mmap: bool | None = None

    @property
    def offloading(self) -> bool:
        return (
            self.device_memory is not None
            or self.expert_slots is not None
            or self.experts in ("cpu", "hybrid")
        )

    def model_dtype(self, cfg: ModelConfig) -> torch.dtype:
        """The dtype asked for, or the checkpoint's (bf16 for an fp16 checkpoint on the CPU)."""
        if self.dtype is not None:
            return self.dtype
        dtype = DTYPES.get(cfg.torch_dtype, torch.bfloat16)
        if dtype == torch.float16 and self.device.type == "cpu":
            return torch.bfloat16  # CPU kernels for fp16 are slow; bf16 has the range fp16 lacks
        return dtype

    def check_context(self, cfg: ModelConfig, dtype: torch.dtype) -> int:
        """The context window for this model, refused if its KV cache cannot fit in memory."""
        context = min(self.context, cfg.sliding_window or cfg.max_position_embeddings)
        if self.sinks >= context:
            raise OptionError(f"sinks ({self.sinks}) must be fewer than the context ({context})")
        itemsize = torch.empty((), dtype=dtype).element_size()
        kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
        free = available_memory(self.device)
        if free is not None and kv * context > free:
            raise OptionError(
                f"a context of {context} tokens needs {gib(kv * context)} of KV cache, "
                f"more than the {gib(free)} free on {self.device}; choose a smaller "
                "--context"
            )
        return context


def load_options(
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    context: int | None = None,
    sinks: int = 0,
    device_memory: str | int | None = None,
    expert_slots: int | None = None,
    policy: str | None = None,
    prefetch: int | None = None,
    experts: str = DEFAULT_EXPERTS,
    mmap: bool | None = None,
) -> LoadOptions:
    """Check raw load options (as typed on a command line or passed to `localmix.load`); None
    stands for the default."""
    return LoadOptions(
        device=parse_device(device),
        dtype=parse_dtype(dtype),
        context=whole("context", DEFAULT_CONTEXT if context is None else context, 1),
        sinks=whole("sinks", sinks, 0),
        device_memory=None if device_memory is None else parse_budget(device_memory),
        expert_slots=None if expert_slots is None else whole("expert slots", expert_slots, 1),
        policy=parse_policy(DEFAULT_POLICY if policy is None else policy),
        prefetch=whole("prefetch", DEFAULT_PREFETCH if prefetch is None else prefetch, 0),
        experts=parse_experts(experts),
        mmap=None if mmap is None else flag("mmap", mmap),
    )


def split_options(options: dict[str, Any]) -> tuple[LoadOptions, SamplingOptions]:
    """`localmix.load`'s options, checked: those of `load_options`, and the rest as the sampling
    defaults."""
    names = {f.name for f in fields(LoadOptions)}
    unknown = sorted(set(options) - names - set(SamplingOptions.names()))
    if unknown:
        raise OptionError(
            f"unknown option(s): {', '.join(unknown)}; loading takes {', '.join(sorted(names))} "
            f"and the sampling defaults {', '.join(SamplingOptions.names())}"
        )
    sampling = {k: v for k, v in options.items() if k not in names}
    load = {k: v for k, v in options.items() if k in names}
    return load_options(**load), SamplingOptions().updated(**sampling)


def whole(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{name} must be a whole number, not {value!r}")
    if value < least:
        raise OptionError(f"{name} must be at least {least}, not {value}")
    return value


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f"{name} must be True or False, not {value!r}")
    return value


def parse_device(device: str | torch.device | None) -> torch.device:
    """cpu, or cuda (cuda:N) where CUDA is present; the default is cuda when present."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"unknown device '{device}'; use cpu or cuda") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise OptionError(f"localmix runs on cpu or cuda, not '{device}'")
    if not torch.cuda.is_available():
        raise OptionError(f"no CUDA device here for '{device}'; use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OptionError(f"no device '{device}': this machine has {torch.cuda.device_count()}")
    return dev


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise OptionError(f"unknown dtype '{dtype}'; use bf16, fp16 or fp32")
    return DTYPES[dtype]


def parse_budget(device_memory: str | int) -> int:
    budget = parse_bytes(device_memory)
    if budget <= 0:
        raise OptionError(f"the device memory budget must be positive, not '{device_memory}'")
    return budget


def parse_experts(experts: str) -> str:
    from .hybrid import MODES

    modes = ("auto", *MODES)
    if experts not in modes:
        raise OptionError(f"unknown experts mode '{experts}'; use {', '.join(modes)}")
    return experts


def parse_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise OptionError(f"unknown policy '{policy}'; use {', '.join(POLICIES)}")
    return policy


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (None where that cannot be told): on the host,
    the system's available memory, or less where the process's control group limits it."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    left = cgroup_memory_left()
    return left if free is None else free if left is None else min(free, left)


def cgroup_memory_left(
    proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """What this process's memory control group and those above it still allow it (the limit
    less the usage, the least of them; cgroup v2 or v1), or None without a limit: a container's
    limit, which /proc/meminfo does not show."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    rooms: list[int] = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, group = line.split(":", 2)
        if not controllers:  # the v2 hierarchy
            rooms += _rooms(root, group, "memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            rooms += _rooms(
                root / "memory", group, "memory.limit_in_bytes", "memory.usage_in_bytes"
            )
    return max(min(rooms), 0) if rooms else None


def _rooms(base: Path, group: str, limit_file: str, usage_file: str) -> list[int]:
    """Limit less usage of `group` under `base` and of each group above it that sets a limit
    (v2 writes "max" for none, v1 a number near 2**63)."""
    folder, rooms = base / group.strip().lstrip("/"), []
    while folder == base or base in folder.parents:
        try:
            limit = (folder / limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:
                rooms.append(int(limit) - int((folder / usage_file).read_text()))
        except (OSError, ValueError):
            pass
        folder = folder.parent
    return rooms
