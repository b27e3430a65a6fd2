"""Coverage-guided fuzzing of every parser of network bytes (tests/fuzz/): the committed
corpus replays without a crash, and a short bounded atheris pass of each target finds none.

bench/fuzz.py runs the same targets for a million inputs each. A crashing input found
there is fixed in src/ and added to tests/fuzz/corpus/<target>/ as crash-<what>, so that
test_corpus_replays keeps it fixed.
"""

from __future__ import annotations

import pytest

from tests.fuzz.runner import TARGET_NAMES, run_target, seed_files
from tests.fuzz.targets import TARGETS

# A CI pass: per target 20,000 inputs or 9 s, whichever comes first (13 targets: < 2 min).
SHORT_RUNS, SHORT_SECONDS = 20_000, 9


def test_every_target_has_a_seed_corpus() -> None:
    assert set(TARGETS) == set(TARGET_NAMES)
    for name in TARGET_NAMES:
        assert len(seed_files(name)) >= 3, f"tests/fuzz/corpus/{name} has (almost) no seeds"


@pytest.mark.parametrize("name", TARGET_NAMES)
def test_corpus_replays(name: str) -> None:
    """Every seed and regression input goes through its target without a crash."""
    target = TARGETS[name]
    for path in seed_files(name):
        try:
            target(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - name the input that crashed
            raise AssertionError(f"{path} crashes the {name} target: {exc!r}") from exc


@pytest.mark.parametrize("name", TARGET_NAMES)
def test_short_fuzz_pass_finds_no_crash(name: str, tmp_path) -> None:
    run = run_target(name, tmp_path, runs=SHORT_RUNS, seconds=SHORT_SECONDS)
    assert run.executions > 0, run.tail()
    assert run.crashes == 0, f"{name}: crashing inputs {run.artifacts}\n{run.tail()}"
