"""CPU threads: the default count, the wait policy the command line sets, --threads, and what
`run -v` and `show` report about kernels and CPU features."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from localmix.quant.convert import Settings, convert

from localmix.errors import OptionError
from localmix.threads import (
    BRIEF_SPIN,
    SPIN_COUNT,
    WAIT_POLICY,
    WAIT_SETTINGS,
    check_threads,
    physical_cores,
    prepare_process,
)
from tests.helpers import save_reference, tiny_mixtral_config


def topology(root, cpus: dict[int, tuple[int, int]]):
    for cpu, (package, core) in cpus.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{package}\n")
        (d / "core_id").write_text(f"{core}\n")
    return root


def test_hyperthreads_count_once(tmp_path):
    # 4 logical CPUs on 2 cores (siblings 0/2 and 1/3), and a second package's core 0
    root = topology(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 4: (1, 0)})
    assert physical_cores([0, 1, 2, 3], root) == 2
    assert physical_cores([0, 2], root) == 1  # an affinity mask of one core's two threads
    assert physical_cores([0, 1, 2, 3, 4], root) == 3
    assert physical_cores([7, 8], root) == 2  # no topology to read: every CPU counts


def test_thread_option_is_checked():
    assert check_threads(1) == 1
    for bad in (0, -1, 10_000):
        with pytest.raises(OptionError, match="--threads must be between 1 and"):
            check_threads(bad)


@pytest.mark.parametrize("choice", WAIT_SETTINGS)
def test_wait_policy_default_is_a_brief_spin_and_leaves_a_users_choice(monkeypatch, choice):
    """Each OpenMP runtime's threads spin briefly unless the user set that runtime's variable;
    OMP_WAIT_POLICY is both runtimes' and leaves both alone."""
    names = WAIT_SETTINGS
    for name in names:
        monkeypatch.delenv(name, raising=False)
    prepare_process()
    assert {n: os.environ.get(n) for n in names} == {WAIT_POLICY: None, **BRIEF_SPIN}
    for name in BRIEF_SPIN:
        monkeypatch.delenv(name)
    monkeypatch.setenv(choice, "7")
    prepare_process()
    expected = {WAIT_POLICY: None, **BRIEF_SPIN} if choice != WAIT_POLICY else dict.fromkeys(names)
    assert {n: os.environ.get(n) for n in names} == {**expected, choice: "7"}


def test_run_reports_threads_kernels_and_cpu_features(tmp_path):
    """A fresh `localmix` process: the wait policy is set before PyTorch loads, --threads is
    applied, and -v names the kernels and the CPU features they were chosen for."""
    quantized = tmp_path / "q"
    save_reference(tmp_path / "src", tiny_mixtral_config())
    convert(tmp_path / "src", quantized, Settings(method="rtn"))
    env = {k: v for k, v in os.environ.items() if k not in WAIT_SETTINGS}
    command = [sys.executable, "-m", "localmix.cli", "run", str(quantized), "x", "--raw"]
    r = subprocess.run(
        command + ["--max-tokens", "2", "-v", "--threads", "1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert f"CPU: 1 thread, idle threads wait: spin {BRIEF_SPIN[SPIN_COUNT]} polls" in r.stderr
    assert "quantized matmuls: localmix AVX2+FMA kernels (CPU: avx2 fma" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "localmix.cli", "show", str(quantized)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "CPU kernels  localmix AVX2+FMA kernels (CPU: avx2 fma" in r.stdout
    r = subprocess.run(command + ["--threads", "0"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stderr.strip().endswith("(this machine's CPUs)")
    assert len(r.stderr.strip().splitlines()) == 1
