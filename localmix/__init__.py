"""localmix: run Mixtral-style sparse MoE models on one consumer GPU."""

from __future__ import annotations

import os
from typing import Any

import torch

from .config import ModelConfig
from .engine import Engine, Summary, TokenEvent
from .errors import LocalmixError
from .expert_cache import DEFAULT_POLICY
from .offload import DEFAULT_PREFETCH
from .sampling import SamplingOptions

__all__ = [
    "load",
    "Engine",
    "ModelConfig",
    "Summary",
    "TokenEvent",
    "LocalmixError",
    "SamplingOptions",
]
__version__ = "0.1.0"

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def _dtype(value: str | torch.dtype | None, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value is not None:
        if value not in DTYPES:
            raise LocalmixError(f"unknown dtype '{value}'; use bf16, fp16 or fp32")
        return DTYPES[value]
    dtype = DTYPES.get(cfg.torch_dtype, torch.bfloat16)
    if dtype == torch.float16 and device.type == "cpu":
        return torch.bfloat16  # CPU kernels for fp16 are slow; bf16 has the range fp16 lacks
    return dtype


def load(
    model: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    context: int | None = None,
    sinks: int = 0,
    device_memory: str | int | None = None,
    expert_slots: int | None = None,
    policy: str = DEFAULT_POLICY,
    prefetch: int = DEFAULT_PREFETCH,
    **options: Any,
) -> Engine:
    """Load a model directory or name and return an Engine ready to generate.

    `device` defaults to CUDA when present. `dtype` defaults to the checkpoint's. `context` is
    the rolling KV window (default 4096, at most the model's sliding window); `sinks` keeps the
    first tokens attended once the window rolls.

    Offloading: with `device_memory` (e.g. "12GB") or `expert_slots` (per layer), the trunk and
    KV cache go on the device and experts stay in host RAM, served through a per-layer expert
    cache with the eviction `policy` ("transition" or "lru"), prefetching `prefetch` layers
    ahead from router predictions (0: off). `Engine.plan` describes the placement.
    Other options set sampling defaults.
    """
    from .loader import load_transformer, read_manifest
    from .quant.kernels import cpu_kernels
    from .store import resolve
    from .tokenizer import Tokenizer, conversation_format

    name, path = resolve(model)
    manifest = read_manifest(path)  # refuses an unfinished quantization before anything else
    cfg = ModelConfig.from_file(path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = _dtype(dtype, cfg, dev)
    offloading = device_memory is not None or expert_slots is not None
    if offloading and not cfg.is_moe:
        raise LocalmixError("expert offloading needs a mixture-of-experts model")
    host = torch.device("cpu")
    net = load_transformer(path, cfg, dt, host if offloading else dev, manifest)
    if manifest is not None and dev.type == "cpu":
        cpu_kernels()  # built once, here rather than in the middle of the first reply
    tokenizer = Tokenizer(path / "tokenizer.model", vocab_size=cfg.vocab_size)
    defaults = SamplingOptions().updated(**options)
    engine = Engine(
        net,
        tokenizer,
        name=name,
        path=path,
        device=dev,
        dtype=dt,
        context=context,
        sinks=sinks,
        defaults=defaults,
        template=conversation_format(path, tokenizer),
    )
    if offloading:
        engine.offload_experts(device_memory, expert_slots, policy, prefetch)
    return engine
