"""Run one fuzz target under atheris (libFuzzer): coverage-guided, until a limit or a crash.

    python -m tests.fuzz.harness TARGET [libFuzzer flags] [CORPUS_DIR ...]

e.g. ``python -m tests.fuzz.harness message -runs=1000000 -max_total_time=600 work/
tests/fuzz/corpus/message``: new inputs go to the first directory, the others are read
only. atheris.Fuzz() never returns: libFuzzer exits the process (0 when a limit is reached,
non-zero on a crash, after writing the input to ``-artifact_prefix``). bench/fuzz.py runs
every target this way and reads the statistics libFuzzer prints.

Only sipmesh and aioice's STUN parser are instrumented; the str hook lets the fuzzer learn the literals the parsers
compare against (startswith, ==), the seed corpus gives it the rest.
"""

from __future__ import annotations

import sys

import atheris


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1].startswith("-"):
        sys.exit("usage: python -m tests.fuzz.harness TARGET [libFuzzer flags] [CORPUS_DIR ...]")
    name = argv[1]
    # (atheris 3.0's "RegEx" hook fails on bytes patterns, which message.py has)
    atheris.enabled_hooks.add("str")
    with atheris.instrument_imports(include=["sipmesh", "aioice.stun", "tests.fuzz.targets"]):
        from tests.fuzz.targets import TARGETS
    if name not in TARGETS:
        sys.exit(f"unknown target {name!r} (known: {', '.join(TARGETS)})")
    atheris.Setup([argv[0], *argv[2:]], TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
