"""Decode speed on an idle machine and on one where another program keeps a core busy.

    python -m benchmarks.bench_threads [--model demo] [--runs 5] [--tokens 96]

For each thread count (1, localmix's default of one per physical core less one, and one per
physical core) and each way idle OpenMP threads wait (`sleep`: OMP_WAIT_POLICY=PASSIVE; `spin`:
ACTIVE; `brief spin`: localmix's default from the command line, `threads.BRIEF_SPIN`; and
`--spin-counts` more GOMP_SPINCOUNT values to compare), a fresh process decodes `--tokens`
tokens greedily after a warm-up, `--runs` rounds of every setting in turn (a machine whose
speed drifts slows all settings alike); the same again while a competing process spins on one
core.
Prints the median and the spread of decode tokens/s, and each setting's ratio to localmix's
default in the same condition.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from localmix.threads import (
    BRIEF_SPIN,
    SPIN_COUNT,
    WAIT_POLICY,
    WAIT_SETTINGS,
    default_threads,
    physical_cores,
    usable_cpus,
)

DEFAULT = "brief spin"
POLICIES = {
    "sleep": {WAIT_POLICY: "PASSIVE"},
    "spin": {WAIT_POLICY: "ACTIVE"},
    DEFAULT: BRIEF_SPIN,
}

DECODE = """
import sys, torch, localmix
torch.set_num_threads(int(sys.argv[1]))
engine = localmix.load(sys.argv[2], device="cpu")
engine.complete("def main():\\n", temperature=0, max_tokens=8)  # warm-up
engine.reset()
s = engine.complete("def main():\\n", temperature=0, max_tokens=int(sys.argv[3]))
print(s.decode_tokens_per_s)
"""

SPIN = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"


def decode_rate(threads: int, policy: str, args: argparse.Namespace) -> float:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_SETTINGS}
    env.update(policies(args)[policy])
    out = subprocess.run(
        [sys.executable, "-c", DECODE, str(threads), args.model, str(args.tokens)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument(
        "--spin-counts", default="", help="more GOMP_SPINCOUNT values to compare, comma-separated"
    )
    args = ap.parse_args()
    default = default_threads()
    counts = sorted({1, default, physical_cores(usable_cpus())})
    settings = [(t, p) for t in counts for p in policies(args)]
    print(f"{args.model}: decode tokens/s, median (min-max) of {args.runs} runs of {args.tokens}")
    for condition in ("idle", "one core busy"):
        competitor = None
        if condition != "idle":
            competitor = subprocess.Popen([sys.executable, "-c", SPIN])
            time.sleep(0.5)
        results: dict[tuple[int, str], list[float]] = {s: [] for s in settings}
        try:
            for _ in range(args.runs):  # rounds: every setting once per round, in turn
                for s in settings:
                    results[s].append(decode_rate(*s, args))
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
        base = statistics.median(results[default, DEFAULT])
        print(f"  {condition}:")
        for (threads, policy), rates in results.items():
            med = statistics.median(rates)
            mark = "  <- default" if (threads, policy) == (default, DEFAULT) else ""
            print(
                f"    {threads} thread{'s' if threads > 1 else ' '} {policy:<17} {med:7.1f} "
                f"({min(rates):.0f}-{max(rates):.0f})  {med / base:.2f}x{mark}"
            )


def policies(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """The ways of waiting compared: name -> the environment that sets it."""
    extra = [c.strip() for c in args.spin_counts.split(",") if c.strip()]
    return {**POLICIES, **{f"spin {c}, sleep": {SPIN_COUNT: c} for c in extra}}


if __name__ == "__main__":
    main()
