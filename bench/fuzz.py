"""Coverage-guided fuzzing of every parser of network bytes, with the figures.

    python bench/fuzz.py [--runs 1000000] [--seconds 1800] [--jobs 1] [--keep DIR] [TARGET ...]

Runs each target (tests/fuzz/targets.py) in its own atheris/libFuzzer process until it has
executed --runs inputs or spent --seconds, starting from the committed seed corpus
(tests/fuzz/corpus/<target>, plus the RFC 4475/5118 vectors for message and stream), and
prints one row per target: executions, executions per second (wall clock, start-up
included), coverage (libFuzzer's cov: instrumented edges; ft: features), the corpus size
at the end, the peak RSS and the crashes. A crash is an exception other than the parser's
own error type, an input running longer than 10 s, or the process above 1024 MB; its input
is kept under --keep (default: a temporary directory that is printed). Exit status 1 if any
target crashed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fuzz.runner import TARGET_NAMES, FuzzRun, run_target  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"default: all ({', '.join(TARGET_NAMES)})")
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per target [1000000]")
    parser.add_argument("--seconds", type=int, default=1800, help="time limit per target [1800]")
    parser.add_argument("--jobs", type=int, default=1, help="targets fuzzed at the same time [1]")
    parser.add_argument("--seed", type=int, help="libFuzzer's random seed (default: random)")
    parser.add_argument("--keep", type=Path, help="directory for the corpora and crash inputs")
    args = parser.parse_args()
    unknown = set(args.targets) - set(TARGET_NAMES)
    if unknown:
        parser.error(f"unknown target(s) {', '.join(sorted(unknown))}")
    targets = args.targets or list(TARGET_NAMES)
    work = args.keep or Path(tempfile.mkdtemp(prefix="sipmesh-fuzz-"))
    print(f"fuzzing {', '.join(targets)}: {args.runs} inputs or {args.seconds} s each; work in {work}",
          flush=True)

    def one(target: str) -> FuzzRun:
        run = run_target(target, work / target, runs=args.runs, seconds=args.seconds, seed=args.seed)
        print(f"  {target}: {run.executions} inputs, {run.crashes} crashes", flush=True)
        return run

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        runs = list(pool.map(one, targets))
    print()
    print(f"{'target':<11} {'executions':>11} {'exec/s':>7} {'cov':>5} {'ft':>6} {'corpus':>6} "
          f"{'rss MB':>6} {'crashes':>7}")
    for run in runs:
        print(f"{run.target:<11} {run.executions:>11} {run.exec_per_s:>7} {run.coverage:>5} "
              f"{run.features:>6} {run.corpus:>6} {run.peak_rss_mb:>6} {run.crashes:>7}")
    for run in runs:
        if run.crashes:
            print(f"\n== {run.target}: exit {run.returncode}, inputs: {', '.join(map(str, run.artifacts))}")
            print(run.tail())
    return 1 if any(run.crashes for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
