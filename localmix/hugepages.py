"""Host memory on transparent huge pages, for what a CPU decode step reads end to end every
token: the weights and the KV cache.

A decode step streams some hundred megabytes through the CPU. On 4 KiB pages (a file mapping's;
malloc's too unless transparent huge pages are "always") that is a TLB miss every 4 KiB, and
mini decodes 4-8% slower on the test machine than from 2 MiB pages
(benchmarks/bench_hugepages.py measures it). Linux gives huge pages
to anonymous memory advised MADV_HUGEPAGE when transparent huge pages are "always" or
"madvise" (the common default); never to a private file mapping that is only read.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch

from .errors import MemoryBudgetError
from .units import MiB, mib

HUGE_PAGE = 2 * MiB
ALIGN = 64  # a cache line: where every tensor of an arena starts
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
FREE_SHARE = 0.8  # `fits`: the most of the available memory a copy of the weights may take


def supported() -> bool:
    """Whether anonymous memory advised MADV_HUGEPAGE gets huge pages here: Linux with
    transparent huge pages "always" or "madvise" (the bracketed word of the setting)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[never]" not in setting


def fits(nbytes: int) -> bool:
    """Whether a private copy of `nbytes` leaves room in the host's available memory (a file
    mapping's pages can be dropped under pressure and read again; a copy's cannot)."""
    from .options import available_memory

    free = available_memory(torch.device("cpu"))
    return free is not None and nbytes <= FREE_SHARE * free


def buffer(nbytes: int) -> torch.Tensor:
    """`nbytes` of zeroed uint8 host memory. On Linux it starts on a huge page boundary and is
    advised MADV_HUGEPAGE, and pages are touched lazily: what is never written takes no memory.
    The mapping lives as long as any view of the tensor. Elsewhere it is plain memory."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(nbytes, dtype=torch.uint8)
    try:
        mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:
        raise MemoryBudgetError(
            f"could not allocate {mib(nbytes)} of host memory ({e.strerror}); free some memory"
        ) from e
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: plain pages then
        pass
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    skip = -whole.data_ptr() % HUGE_PAGE
    return whole[skip : skip + nbytes]


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape, dtype=dtype) on the CPU, in huge pages where `supported()`."""
    if not supported():
        return torch.zeros(shape, dtype=dtype)
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return buffer(n).view(dtype).view(shape)


class Arena:
    """One huge-page buffer cut into tensors, each starting on a cache line (the kernels' loads
    never straddle two): `slot(nbytes)` hands out the next `nbytes`."""

    def __init__(self, sizes: list[int]) -> None:
        self.data = buffer(sum(aligned(n) for n in sizes))
        self.used = 0

    def slot(self, nbytes: int) -> torch.Tensor:
        if self.used + nbytes > self.data.numel():
            raise ValueError(f"the arena has {self.data.numel() - self.used} bytes left")
        view = self.data[self.used : self.used + nbytes]
        self.used += aligned(nbytes)
        return view


def aligned(nbytes: int) -> int:
    """nbytes rounded up to a whole number of cache lines."""
    return -(-nbytes // ALIGN) * ALIGN
