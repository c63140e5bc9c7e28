"""localmix's own CPU kernels for quantized matrix-vector products, compiled once on first use.

A decode step multiplies each weight by one activation row. PyTorch's int4 CPU kernel unpacks
4-bit codes at ~7 GB/s on an AVX2 machine, slower than reading the bf16 weight it replaces.
`csrc/gemv_cpu.cpp` rounds 16-bit activations to int8 (per weight group for 4-bit weights,
per 32 columns for 8-bit ones), as llama.cpp does, and multiplies 32 codes per integer
instruction: 2-3x PyTorch's speed in 4 bits (benchmarks/bench_quant.py measures both), with
an error well below that of the quantized weights. Float32 activations (a model loaded with
dtype="fp32") take an exact float32 path instead. The same module also runs the converter's
scale fit (`formats._fit_groups`), eight groups per AVX2 register.

The module is built with PyTorch's C++ extension machinery into TORCH_EXTENSIONS_DIR (by
default ~/.cache/torch_extensions) the first time it is needed (a quantized model on the CPU,
or a conversion), which takes about a minute; later runs load the cached build.

Where it cannot be built or run (no C++ compiler, a CPU without AVX2 and FMA, or
LOCALMIX_CPU_KERNELS=0 in the environment), `cpu_kernels()` returns None, `unavailable_reason()`
says why, and the caller uses PyTorch's kernels: slower, never wrong.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).parent / "csrc" / "gemv_cpu.cpp"
ENV_SWITCH = "LOCALMIX_CPU_KERNELS"
BUILD_NAME = "localmix_gemv_cpu_v1"  # bump with any change to the source's interface
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]


def _cpu_supports() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "1") == "0"


@functools.cache
def _build(source: Path = SOURCE, name: str = BUILD_NAME) -> tuple[ModuleType | None, str]:
    """(module, "") or (None, why not); built once per process."""
    if not _cpu_supports():
        return None, f"the CPU lacks AVX2 ({torch.backends.cpu.get_cpu_capability()})"
    from torch.utils import cpp_extension

    build_dir = build_directory(name)
    if not any(build_dir.glob(f"{name}*.so")):
        print("localmix: building the CPU kernels (once, about a minute)...", file=sys.stderr)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = cpp_extension.load(
                name,
                [str(source)],
                extra_cflags=FLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
    except Exception as exc:  # a missing compiler or ninja surfaces as several exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"could not be built ({first})"
    return module, ""


def build_directory(name: str = BUILD_NAME) -> Path:
    """Where the build lives: under TORCH_EXTENSIONS_DIR (or ~/.cache/torch_extensions), one
    folder per Python and PyTorch version so an upgrade rebuilds instead of loading a stale .so."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    version = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
    return Path(root) / f"{name}-{version}"


def cpu_kernels() -> ModuleType | None:
    """The compiled module (`int4_mm`, `int4_swiglu`, `int8_mm`, `fit_groups`), or None."""
    return None if _switched_off() else _build()[0]


def unavailable_reason() -> str:
    """Why `cpu_kernels()` is None ("" when the kernels are in use)."""
    return f"turned off by {ENV_SWITCH}=0" if _switched_off() else _build()[1]


def describe() -> str:
    """One line for reports: which kernels quantized CPU matmuls run on."""
    if cpu_kernels() is not None:
        return "localmix AVX2 kernels"
    return f"PyTorch kernels (localmix's own: {unavailable_reason()})"
