"""How many CPU threads localmix computes with, and how its idle threads wait.

A decode step runs a hundred or more short parallel regions. By default OpenMP keeps idle
threads spinning between them, which is fastest on an idle machine and ruinous on a busy one:
when another program holds one of the cores, every region waits for the thread that lost its
core, and decode slows down sharply (benchmarks/bench_threads.py measures it). Idle threads
that sleep instead (OMP_WAIT_POLICY=PASSIVE) give their core back, so the scheduler can run the
late thread there at once. The policy is read when the OpenMP runtime loads, that is when
PyTorch is first imported: `prepare_process` must run before that, and only the command line
does it (a library does not change its host process's environment).

The thread count defaults to the physical cores this process may run on (hyperthreads share a
core's load and store units, which decode is bound by) less one, so that the desktop's own
programs do not take a core from a thread every region waits for; `--threads` overrides it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import OptionError

WAIT_POLICY = "OMP_WAIT_POLICY"
DEFAULT_WAIT_POLICY = "PASSIVE"


def prepare_process() -> None:
    """Before PyTorch is imported: idle OpenMP threads sleep (unless OMP_WAIT_POLICY is set)."""
    os.environ.setdefault(WAIT_POLICY, DEFAULT_WAIT_POLICY)


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int], topology: Path = Path("/sys/devices/system/cpu")) -> int:
    """How many physical cores `cpus` span (hyperthread siblings count once); len(cpus) where
    the topology cannot be read."""
    cores = set()
    for cpu in cpus:
        base = topology / f"cpu{cpu}" / "topology"
        try:
            package = (base / "physical_package_id").read_text().strip()
            core = (base / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return max(1, len(cores))


def default_threads() -> int:
    """One thread per physical core available to this process, less one left to the rest of
    the machine (a desktop's own programs) where there are two or more."""
    return max(1, physical_cores(usable_cpus()) - 1)


def check_threads(threads: int | None) -> int:
    """A thread count from an option: None for the default, else 1..(logical CPUs)."""
    if threads is None:
        return default_threads()
    limit = len(usable_cpus())
    if not 1 <= threads <= limit:
        raise OptionError(f"--threads must be between 1 and {limit} (this machine's CPUs)")
    return threads


def set_threads(threads: int | None) -> int:
    """Compute with `threads` CPU threads (None: the default); returns the count in use."""
    import torch

    n = check_threads(threads)
    torch.set_num_threads(n)
    return n


def describe() -> str:
    """One line for reports: the threads and how idle ones wait."""
    import torch

    policy = os.environ.get(WAIT_POLICY, "unset (OpenMP's default: spin)")
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n > 1 else ''}, idle threads wait: {policy}"
