"""How many CPU threads localmix computes with, and how its idle threads wait.

A decode step runs dozens of short parallel regions, a few microseconds to a few hundred apart.
How OpenMP's idle threads wait between them decides much of its speed:
- spinning without end (OMP_WAIT_POLICY=ACTIVE) is fastest on an idle machine and ruinous on a
  busy one: when another program holds one of the cores, every region waits for the thread
  that lost its core while the others spin on theirs;
- sleeping at once (PASSIVE) gives the core back, but every region then pays a wake-up (on the
  order of 100 us in a virtual machine), some milliseconds a token;
- spinning briefly, then sleeping, keeps the threads awake between the kernels of a step and
  gives the cores back within some tens of microseconds once decode pauses or another program
  needs one. `prepare_process` sets that (GNU OpenMP's GOMP_SPINCOUNT, which PyTorch's
  Linux builds use, and Intel OpenMP's KMP_BLOCKTIME) unless the user chose a policy.
benchmarks/bench_threads.py measures the three. The policy is read when the OpenMP runtime
loads, that is when PyTorch is first imported: `prepare_process` must run before that, and
only the command line does it (a library does not change its host process's environment).

The thread count defaults to the physical cores this process may run on (hyperthreads share a
core's load and store units, which decode is bound by) less one, so that the desktop's own
programs do not take a core from a thread every region waits for; `--threads` overrides it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .errors import OptionError

WAIT_POLICY = "OMP_WAIT_POLICY"
SPIN_COUNT = "GOMP_SPINCOUNT"  # GNU OpenMP: how many times an idle thread polls before it sleeps
BLOCK_TIME = "KMP_BLOCKTIME"  # Intel OpenMP: milliseconds an idle thread spins before it sleeps
# About 30 us of polling (a poll is one `pause`, 10-40 ns on current x86 cores): longer than the
# gaps between the kernels of a decode step, short enough that threads which share their cores
# with other busy programs lose little (docs/benchmarks.md). Intel OpenMP counts in whole
# milliseconds, too long: its threads sleep at once, as PASSIVE made them before.
BRIEF_SPIN = {SPIN_COUNT: "1000", BLOCK_TIME: "0"}
WAIT_SETTINGS = (WAIT_POLICY, SPIN_COUNT, BLOCK_TIME)  # every variable that says how they wait


def prepare_process() -> None:
    """Before PyTorch is imported: idle OpenMP threads spin briefly, then sleep (`BRIEF_SPIN`),
    for each OpenMP runtime whose setting the environment does not give (OMP_WAIT_POLICY
    gives both)."""
    for name, value in BRIEF_SPIN.items():  # each runtime's own setting, unless one is given
        if WAIT_POLICY not in os.environ and name not in os.environ:
            os.environ[name] = value


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

    n = torch.get_num_threads()
    return f"{n} thread{'s' if n > 1 else ''}, idle threads wait: {wait_policy()}"


def wait_policy(env: Mapping[str, str] = os.environ) -> str:
    """How idle OpenMP threads wait under `env`, in words."""
    if WAIT_POLICY in env:
        return env[WAIT_POLICY]
    if SPIN_COUNT in env:
        return f"spin {env[SPIN_COUNT]} polls, then sleep"
    return "unset (OpenMP's default)"
