"""localmix's own CPU kernels for quantized matrix-vector products, compiled once on first use.

A decode step multiplies each weight by one activation row. PyTorch's int4 CPU kernel unpacks
4-bit codes more slowly on an AVX2 machine than the bf16 weight it replaces could be read.
`csrc/gemv_cpu.cpp` rounds 16-bit activations to int8 (per weight group for 4-bit weights,
per 32 columns for 8-bit ones), as llama.cpp does, and multiplies 32 codes per integer
instruction: faster than PyTorch in 4 bits (benchmarks/bench_quant.py measures both), with
an error well below that of the quantized weights. Float32 activations (a model loaded with
dtype="fp32") take an exact float32 path instead. The same module also runs the converter's
scale fit (`formats.fit_groups`), eight groups per AVX2 register.

The module is built with PyTorch's C++ extension machinery into TORCH_EXTENSIONS_DIR (by
default ~/.cache/torch_extensions) the first time it is needed (a model run on the CPU, whose
norms it computes too, or a conversion), which takes a while; later runs load the
cached build.

The kernels need AVX2 and FMA. Whether this CPU has them is read from the CPU itself when the
kernels are first asked for (the build's flags say nothing about the machine that loads it);
on a CPU without them the module is never loaded. Where the kernels cannot be built or run (no
C++ compiler, a CPU without AVX2 and FMA, or LOCALMIX_CPU_KERNELS=0 in the environment),
`cpu_kernels()` returns None, `unavailable_reason()` says why, and the caller uses PyTorch's
kernels, fed a layout packed on this machine by PyTorch's own function: slower, never wrong.
A module asks once, when it chooses its forward (`quant.choice`), not on every call: the switch
reaches the modules that have not run yet, or have moved since.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).parent / "csrc" / "gemv_cpu.cpp"
ENV_SWITCH = "LOCALMIX_CPU_KERNELS"
BUILD_NAME = "localmix_gemv_cpu_v2"  # bump with any change to the source's interface
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]


NEEDED_FEATURES = ("avx2", "fma")
REPORTED_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")


@functools.cache
def cpu_features() -> frozenset[str]:
    """The instruction-set extensions this CPU and OS offer (Linux: /proc/cpuinfo's flags,
    which the kernel clears for extensions whose register state it does not save).

    Elsewhere, what PyTorch's own run-time dispatch found: AVX2 (which implies FMA on every CPU
    that has it) or AVX-512, else nothing.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    implied = {"AVX2": {"avx2", "fma"}, "AVX512": {"avx2", "fma", "avx512f", "avx512bw"}}
    return frozenset(implied.get(capability, set()))


def _missing_features() -> list[str]:
    return [f for f in NEEDED_FEATURES if f not in cpu_features()]


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "1") == "0"


@functools.cache
def build(source: Path = SOURCE, name: str = BUILD_NAME) -> tuple[ModuleType | None, str]:
    """Build (or load the cached build of) the kernels in `source` as the extension `name`:
    (module, "") or (None, why not), once per process. `cpu_kernels` calls it only on a CPU
    with the features the kernels need; a test builds a broken source through it."""
    from torch.utils import cpp_extension

    build_dir = build_directory(name)
    if not any(build_dir.glob(f"{name}*.so")):
        print("localmix: building the CPU kernels (once, about a minute)...", file=sys.stderr)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with build_guard(build_dir), warnings.catch_warnings():
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


@contextlib.contextmanager
def build_guard(build_dir: Path) -> Iterator[None]:
    """Hold `build_dir` against other localmix processes while PyTorch builds or loads there,
    and clear the `lock` file a killed build left behind.

    PyTorch marks a build in progress with a `lock` file and waits, without end, for it to go;
    a build killed outright (a closed terminal, SIGKILL) never removes it, and every later start
    would hang. Here a build holds an flock on `guard`, which the system releases when its
    process dies: once this process holds it, no localmix build runs in the folder, and a
    `lock` there is stale. Without flock (not POSIX) PyTorch's own locking stands alone.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(build_dir / "guard", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # waits while another localmix process builds here
        (build_dir / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def build_directory(name: str = BUILD_NAME) -> Path:
    """Where the build lives: under TORCH_EXTENSIONS_DIR (or ~/.cache/torch_extensions), one
    folder per Python and PyTorch version so an upgrade rebuilds instead of loading a stale .so."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    version = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
    return Path(root) / f"{name}-{version}"


def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None: the products (`int4_mm`, `int4_swiglu`, `int4_moe`,
    `int8_mm`, `bf16_mm`), a decode step's glue (`attend_one`, `route_one`, `rms_norm`) and the
    converter's `fit_groups`."""
    return None if _switched_off() or _missing_features() else build()[0]


def unavailable_reason() -> str:
    """Why `cpu_kernels()` is None ("" when the kernels are in use)."""
    if _switched_off():
        return f"turned off by {ENV_SWITCH}=0"
    if missing := _missing_features():
        return f"the CPU lacks {' and '.join(f.upper() for f in missing)}"
    return build()[1]


def describe() -> str:
    """One line for reports: which kernels quantized CPU products run on, and the CPU features
    they were chosen for."""
    features = " ".join(f for f in REPORTED_FEATURES if f in cpu_features()) or "none of note"
    cpu = f"CPU: {features}; PyTorch dispatch {torch.backends.cpu.get_cpu_capability()}"
    if cpu_kernels() is not None:
        return f"localmix AVX2+FMA kernels ({cpu})"
    return (
        f"PyTorch int4/int8 kernels on weights packed for this CPU when first used "
        f"(localmix's own: {unavailable_reason()}; {cpu})"
    )
