"""Run fuzz targets in subprocesses (atheris.Fuzz never returns) and read libFuzzer's figures.

Used by bench/fuzz.py (the million-input runs) and tests/test_fuzz.py (a short pass in CI).
Each run reads the committed seed corpus of its target (read only) and writes what it
discovers to a scratch directory; a crashing, hanging or memory-hungry input is written
to the run's artifact directory as crash-*, timeout-*, oom-* or leak-*.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
DATA = ROOT / "tests" / "data"
TARGET_NAMES = ("message", "stream", "uri", "headers", "digest", "sdp", "attributes", "stun",
                "trust", "portmap", "ice", "reginfo", "paths")

# Seeds beyond tests/fuzz/corpus/<target>: the RFC torture vectors, kept where the torture
# tests read them.
EXTRA_SEEDS = {"message": [DATA / "rfc4475", DATA / "rfc5118"],
               "stream": [DATA / "rfc4475", DATA / "rfc5118"]}
# The largest input the fuzzer builds: above the parser's 65,535-byte message limit would
# only test the first comparison, a few KB is where the parsers' work is (the stream target
# scales its limits down to reach them within 8 KB).
MAX_LEN = {"message": 16384, "stream": 8192}
DEFAULT_MAX_LEN = 4096

# Crash criteria besides an exception: an input that runs longer than TIMEOUT seconds is a
# hang; a process above RSS_LIMIT_MB (the harness starts at ~50 MB) has a memory problem.
TIMEOUT = 10
RSS_LIMIT_MB = 1024


def seed_dirs(target: str) -> list[Path]:
    return [d for d in [CORPUS / target, *EXTRA_SEEDS.get(target, [])] if d.is_dir()]


def seed_files(target: str) -> list[Path]:
    return sorted(p for d in seed_dirs(target) for p in d.iterdir() if p.is_file())


@dataclass
class FuzzRun:
    target: str
    returncode: int
    executions: int = 0
    seconds: float = 0.0
    exec_per_s: int = 0
    coverage: int = 0  # libFuzzer "cov": instrumented edges reached
    features: int = 0  # libFuzzer "ft": edges plus hit-count buckets, compares, ...
    corpus: int = 0  # inputs in the corpus at the end (seeds that add coverage + new ones)
    peak_rss_mb: int = 0
    artifacts: list[Path] = field(default_factory=list)
    output: str = ""

    @property
    def crashes(self) -> int:
        return len(self.artifacts) or (1 if self.returncode != 0 else 0)

    def tail(self, lines: int = 60) -> str:
        kept = [line for line in self.output.splitlines() if not line.startswith('"')]
        return "\n".join(kept[-lines:])


_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/", re.MULTILINE)
_DONE = re.compile(r"^Done (\d+) runs in", re.MULTILINE)
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.MULTILINE)


def run_target(target: str, work: Path, *, runs: int, seconds: int, seed: int | None = None,
               timeout: int = TIMEOUT, rss_limit_mb: int = RSS_LIMIT_MB) -> FuzzRun:
    """Fuzz `target` for `runs` inputs or `seconds`, whichever comes first."""
    corpus, artifacts = work / "corpus", work / "artifacts"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "tests.fuzz.harness", target,
            f"-runs={runs}", f"-max_total_time={seconds}", f"-timeout={timeout}",
            f"-rss_limit_mb={rss_limit_mb}", f"-max_len={MAX_LEN.get(target, DEFAULT_MAX_LEN)}",
            f"-artifact_prefix={artifacts}/", "-print_final_stats=1",
            *([f"-seed={seed}"] if seed is not None else []),
            str(corpus), *map(str, seed_dirs(target))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src")]))
    # The process limit leaves libFuzzer time to stop by itself at -max_total_time.
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          errors="replace", timeout=seconds + 120)
    wall = time.monotonic() - started
    out = proc.stdout + proc.stderr
    run = FuzzRun(target, proc.returncode, output=out,
                  artifacts=sorted(p for p in artifacts.iterdir() if p.is_file()))
    status = _STATUS.findall(out)
    if status:
        _, cov, ft, corp = status[-1]
        run.coverage, run.features, run.corpus = int(cov), int(ft), int(corp)
    done = _DONE.search(out)
    stats = dict(_STAT.findall(out))
    run.executions = int(stats.get("number_of_executed_units", done.group(1) if done else 0))
    # Wall time of the whole process (libFuzzer rounds to whole seconds): start-up included.
    run.seconds = wall
    run.exec_per_s = round(run.executions / wall) if wall else 0
    run.peak_rss_mb = int(stats.get("peak_rss_mb", 0))
    return run
