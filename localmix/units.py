"""Byte counts as localmix writes them, so that every label matches its divisor.

Memory (device, host RAM, what a plan places) is counted in binary units, as GPU memory is:
GiB and MiB, from 2**30 and 2**20. Sizes on disk and rates over a link or from RAM are
decimal: GB and MB, from 1e9 and 1e6 (GB/s as datasheets give them). Importable without
PyTorch.
"""

from __future__ import annotations

MiB = 1024**2
GiB = 1024**3
GB = 1e9  # decimal: sizes on disk, rates in GB/s


def gib(n: float) -> str:
    """A memory size in GiB, two decimals: '11.76 GiB'."""
    return f"{n / GiB:.2f} GiB"


def mib(n: float) -> str:
    """A memory size in MiB, one decimal: '94.5 MiB'."""
    return f"{n / MiB:.1f} MiB"


def human_bytes(n: float) -> str:
    """A size on disk or an amount moved, in the decimal unit that fits: '812 B', '3.4 GB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
