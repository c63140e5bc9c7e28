"""`localmix run` answered by a running `localmix serve`, against loading the model in-process.

    python -m benchmarks.bench_serve [--model demo] [--runs 7]

Starts `localmix serve MODEL` on a free loopback port (not the default one, so that nothing
else on the machine finds it), then times whole `localmix run MODEL "def f(x):" --max-tokens 1`
processes, as a user's shell would run them: through the server ($LOCALMIX_HOST names it), and
with `--no-server` (PyTorch imported, the model loaded, then the token). `localmix --help` is
timed beside them as the floor: Python and the command line starting. Prints the median and
best wall time of each, and the in-process time over the server's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

SERVING = re.compile(r"serving on (http://\S+)/v1 ")


def localmix_command() -> list[str]:
    """The installed `localmix` script, or the module where it is not on PATH."""
    script = shutil.which("localmix")
    return [script] if script else [sys.executable, "-m", "localmix.cli"]


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [*localmix_command(), "serve", model, "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:
        if found := SERVING.search(line):
            return proc, found.group(1)
    raise SystemExit(f"the server did not start (exit status {proc.wait()})")


def wall_times(args: list[str], runs: int, env: dict[str, str]) -> list[float]:
    """Wall-clock seconds of `runs` whole processes; a failure stops the benchmark."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(args, env=env, stdin=subprocess.DEVNULL, capture_output=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr.decode()}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--runs", type=int, default=7)
    opts = parser.parse_args()
    server, url = start_server(opts.model)
    try:
        env = {**os.environ, "LOCALMIX_HOST": url}
        run = [*localmix_command(), "run", opts.model, "def f(x):", "--max-tokens", "1"]
        rows = [
            ("localmix --help", wall_times([*localmix_command(), "--help"], opts.runs, env)),
            ("run, through the server", wall_times(run, opts.runs, env)),
            ("run --no-server (in-process)", wall_times([*run, "--no-server"], opts.runs, env)),
        ]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    print(f"{opts.model}, {opts.runs} runs each; whole processes, wall clock")
    print(f"  {'':<30}{'median':>9}{'best':>9}")
    for name, times in rows:
        print(f"  {name:<30}{statistics.median(times):>8.3f}s{min(times):>8.3f}s")
    served, here = statistics.median(rows[1][1]), statistics.median(rows[2][1])
    print(f"  in-process / through the server: {here / served:.1f}x (medians)")


if __name__ == "__main__":
    main()
