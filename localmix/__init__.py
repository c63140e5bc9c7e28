"""localmix: run Mixtral-style sparse MoE models on one consumer GPU.

Importing the package is cheap: PyTorch and the runtime are imported when first used, so the
command line can answer Ctrl+C while it starts.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ModelConfig
    from .engine import Engine
    from .errors import LocalmixError
    from .events import Summary, TokenEvent
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

_LAZY = {
    "Engine": ".engine",
    "Summary": ".events",
    "TokenEvent": ".events",
    "ModelConfig": ".config",
    "LocalmixError": ".errors",
    "SamplingOptions": ".sampling",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'localmix' has no attribute '{name}'")


def load(
    model: str | os.PathLike,
    *,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> Engine:
    """Load a model directory or name and return an Engine ready to generate.

    The options say where and how the model runs (those of `options.load_options`):
    `device` defaults to CUDA when present. `dtype` defaults to the checkpoint's. `context` is
    the rolling KV window (default 4096, at most the model's sliding window); `sinks` keeps the
    first tokens attended once the window rolls. `mmap` says how weights that stay on the CPU
    are held: True as views of the files' mappings (nothing read before use, pages the system
    may drop), False read into memory on huge pages, which the CPU kernels read faster; the
    default reads them in where huge pages are supported and the copy fits in memory.

    Offloading: with `device_memory` (e.g. "12GiB") or `expert_slots` (per layer), the trunk and
    KV cache go on the device and experts stay in host RAM, served through a per-layer expert
    cache with the eviction `policy` ("transition" or "lru"), prefetching `prefetch` layers
    ahead from router predictions (0: off). `experts` says where a missed expert runs: "gpu"
    (copied to the device), "cpu" (every expert computed on the CPU from host RAM), "hybrid"
    (per miss, whichever a cost model of this machine's measured speeds says is faster) or
    "auto" (the mode predicted fastest, on CUDA; "gpu" elsewhere); "cpu" and "hybrid" offload
    by themselves. `Engine.plan` describes the placement, `Engine.predictions` the decode speed
    predicted for each mode, and `progress(done, total)` follows the experts as they fill the
    host store.
    Other options set sampling defaults (those of `SamplingOptions`).

    Every option is checked before anything is read (`options.split_options`): a bad one is an
    `OptionError` that says what to give instead.
    """
    import torch

    from .config import ModelConfig
    from .cpu_decode import use_decode_kernels
    from .engine import Engine
    from .errors import LocalmixError, OptionError
    from .loader import load_transformer, read_manifest
    from .offload import plan_for, probe_machine
    from .options import split_options
    from .quant.kernels import cpu_kernels
    from .quant.linear import cuda_int4_kernel, use_device_kernels
    from .store import resolve
    from .tokenizer import Tokenizer, conversation_format

    opts, defaults = split_options(options)
    name, path = resolve(model)
    manifest = read_manifest(path)  # refuses an unfinished quantization before anything else
    cfg = ModelConfig.from_file(path)
    dt = opts.model_dtype(cfg)
    window = opts.check_context(cfg, dt)
    if opts.offloading and not cfg.is_moe:
        raise LocalmixError("expert offloading needs a mixture-of-experts model")
    offloading = opts.offloading
    if opts.device.type == "cuda" and cfg.is_moe and not offloading:
        # Planned from the free device memory and host RAM before anything is allocated; the
        # experts are offloaded when the whole model does not fit.
        plan = plan_for(
            cfg,
            manifest["quantization"] if manifest else None,
            None,
            str(opts.device),
            window,
            dt,
            machine=probe_machine(opts.device),
            fused_int4=cuda_int4_kernel(opts.device),
        )
        offloading = not plan.all_resident
    if offloading and opts.mmap is False:
        raise OptionError(
            "--no-mmap (mmap=False) reads the weights a model computes with on the CPU into "
            "huge pages; offloaded experts are copied into the expert store instead: leave it out"
        )
    host = torch.device("cpu")
    net = load_transformer(
        path,
        cfg,
        dt,
        host if offloading else opts.device,
        manifest,
        # Offloading copies the experts into the expert store: not into huge pages before.
        mmap=True if offloading else opts.mmap,
    )
    use_device_kernels(net)
    use_decode_kernels(net)
    if manifest is not None and opts.device.type == "cpu":
        cpu_kernels()  # built once, here rather than in the middle of the first reply
    tokenizer = Tokenizer(path / "tokenizer.model", vocab_size=cfg.vocab_size)
    engine = Engine(
        net,
        tokenizer,
        name=name,
        path=path,
        device=opts.device,
        dtype=dt,
        context=window,
        sinks=opts.sinks,
        defaults=defaults,
        template=conversation_format(path, tokenizer),
    )
    if offloading:
        engine.offload_experts(
            opts.device_memory,
            opts.expert_slots,
            opts.policy,
            opts.prefetch,
            progress=progress,
            experts=opts.experts,
        )
        use_device_kernels(engine.model)
    return engine
