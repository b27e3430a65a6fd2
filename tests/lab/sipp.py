"""SIPp (Debian package ``sip-tester``) runs for tests.

:func:`run_sipp` runs a bounded client and returns a :class:`SippResult` parsed from the
``-trace_stat`` CSV (columns by header name); :func:`start_sipp` starts a background SIPp
(e.g. a UAS scenario) as a managed process. Scenarios live in ``tests/lab/scenarios``.

Pitfalls (see shared TESTING notes): SIPp's ``-timeout`` does not always stop it, so the
harness kills it after its own hard timeout; through a multi-worker proxy 180s can arrive
after the 200, so call scenarios should run with ``-default_behaviors all,-abortunexp``.
"""

from __future__ import annotations

import csv
import itertools
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from sipmesh.lab.procs import REGISTRY, ManagedProcess, netns_prefix, spawn, wait_udp_listening

__all__ = [
    "SCENARIOS",
    "SippProcess",
    "SippResult",
    "SippUsers",
    "make_users",
    "parse_stat_csv",
    "run_sipp",
    "scenario",
    "sipp_args",
    "sipp_unavailable_reason",
    "start_sipp",
]

SCENARIOS = Path(__file__).with_name("scenarios")
SIPP = "sipp"
# Through a proxy with several workers a 180 can be lost or come after the 200 (TESTING.md).
CALL_BEHAVIOURS = ["-default_behaviors", "all,-abortunexp"]
_counter = itertools.count(1)


def sipp_unavailable_reason() -> str | None:
    if shutil.which(SIPP) is None:
        return "sipp is not installed (apt-get install sip-tester; see scripts/install --test)"
    return None


def scenario(name: str) -> Path:
    """Path of a bundled scenario: ``scenario('uac_rr')`` or ``scenario('uac_rr.xml')``."""
    p = SCENARIOS / (name if name.endswith(".xml") else name + ".xml")
    if not p.exists():
        raise FileNotFoundError(p)
    return p


# --------------------------------------------------------------------------- users


@dataclass
class SippUsers:
    """Files written by :func:`make_users`.

    ``users_csv`` fields: 0=user 1=password 2=the whole ``[authentication ...]`` keyword
    (SIPp 3.6.1 mis-parses ``[authentication username=[field0] ...]``, SIPp issue #640).
    ``uas_csv`` holds the single user ``uas`` (password ``pwuas``).
    """

    users_csv: Path
    uas_csv: Path
    users: list[tuple[str, str]]

    @property
    def passwords(self) -> dict[str, str]:
        return dict(self.users)


def _auth_field(user: str, pw: str) -> str:
    return f"[authentication username={user} password={pw}]"


def make_users(n: int, out_dir: str | os.PathLike, *, prefix: str = "u",
               password_prefix: str = "pw") -> SippUsers:
    """Write SIPp injection files for users ``u000001..`` with password ``'pw' + user``.

    (The matching Kamailio db_text table is written by ``Kamailio(auth='db_text',
    users=result.users)``; ``auth='static'`` uses the same password rule.)
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    users = [(f"{prefix}{i:06d}", f"{password_prefix}{prefix}{i:06d}") for i in range(1, n + 1)]
    with open(out / "users.csv", "w") as f:
        f.write("SEQUENTIAL\n")
        for u, pw in users:
            f.write(f"{u};{pw};{_auth_field(u, pw)}\n")
    uas_pw = f"{password_prefix}uas"
    with open(out / "uas_user.csv", "w") as f:
        f.write(f"SEQUENTIAL\nuas;{uas_pw};{_auth_field('uas', uas_pw)}\n")
    return SippUsers(out / "users.csv", out / "uas_user.csv", users)


# --------------------------------------------------------------------------- results


def parse_stat_csv(path: str | os.PathLike) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(last row, all rows) of a SIPp ``-trace_stat`` CSV as dicts keyed by column name."""
    p = Path(path)
    if not p.exists():
        return {}, []
    with open(p, newline="", errors="replace") as f:
        rows = [r for r in csv.reader(f, delimiter=";") if r]
    if len(rows) < 2:
        return {}, []
    hdr = rows[0]
    dicts = [dict(zip(hdr, r)) for r in rows[1:]]
    return dicts[-1], dicts


def _int(stats: dict[str, str], key: str) -> int:
    try:
        return int(stats.get(key, "0") or 0)
    except ValueError:
        return 0


@dataclass
class SippResult:
    argv: list[str]
    returncode: int | None
    timed_out: bool
    duration: float
    stats: dict[str, str]
    log: str
    stat_path: Path
    error_path: Path
    rows: list[dict[str, str]] = field(default_factory=list, repr=False)

    @property
    def successful(self) -> int:
        return _int(self.stats, "SuccessfulCall(C)")

    @property
    def failed(self) -> int:
        return _int(self.stats, "FailedCall(C)")

    @property
    def unexpected(self) -> int:
        return _int(self.stats, "FailedUnexpectedMessage(C)")

    @property
    def retransmissions(self) -> int:
        return _int(self.stats, "Retransmissions(C)")

    @property
    def created(self) -> int:
        return _int(self.stats, "TotalCallCreated")

    def stat(self, column: str) -> str | None:
        return self.stats.get(column)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.failed == 0

    def summary(self) -> str:
        return (f"sipp rc={self.returncode}{' (killed: hard timeout)' if self.timed_out else ''} "
                f"created={self.created} successful={self.successful} failed={self.failed} "
                f"unexpected={self.unexpected} retrans={self.retransmissions} "
                f"in {self.duration:.1f}s")

    def __str__(self) -> str:
        """Summary + command + log tail: use as an assertion message."""
        tail = "\n".join(self.log.splitlines()[-40:])
        return f"{self.summary()}\n$ {' '.join(self.argv)}\n{tail}"


def _read(p: Path, limit: int = 200_000) -> str:
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return ""
    return data[-limit:].decode(errors="replace")


# --------------------------------------------------------------------------- running


def _has(args: Sequence[str], opt: str) -> bool:
    return opt in args


def _harness_args(args: Sequence[str], cwd: Path, tag: str, recv_timeout_ms: int | None,
                  stat_interval: int | None) -> tuple[list[str], Path, Path]:
    a = [str(x) for x in args]
    stat = cwd / f"{tag}_stat.csv"
    err = cwd / f"{tag}_errors.log"
    extra = []
    if not _has(a, "-nostdin"):
        extra.append("-nostdin")
    if not _has(a, "-trace_stat"):
        extra.append("-trace_stat")
    if not _has(a, "-stf"):
        extra += ["-stf", str(stat)]
    else:
        stat = Path(a[a.index("-stf") + 1])
        stat = stat if stat.is_absolute() else cwd / stat
    if stat_interval and not _has(a, "-fd"):
        extra += ["-fd", str(stat_interval)]
    if not _has(a, "-trace_err"):
        extra.append("-trace_err")
    if not _has(a, "-error_file"):
        extra += ["-error_file", str(err)]
    else:
        err = Path(a[a.index("-error_file") + 1])
        err = err if err.is_absolute() else cwd / err
    if recv_timeout_ms and not _has(a, "-recv_timeout"):
        extra += ["-recv_timeout", str(recv_timeout_ms)]
    return a + extra, stat, err


def run_sipp(args: Sequence[str], *, cwd: str | os.PathLike, timeout: float = 60.0,
             recv_timeout_ms: int = 10_000, netns: object | None = None,
             name: str | None = None, stat_interval: int | None = 1) -> SippResult:
    """Run ``sipp ARGS`` to completion (bounded) and return its parsed statistics.

    ``args`` are SIPp's own arguments (scenario, remote host, ``-m``, ...). The harness adds
    ``-nostdin -trace_stat -stf <tag>_stat.csv -trace_err -error_file <tag>_errors.log
    -recv_timeout <recv_timeout_ms> -fd <stat_interval>`` unless given, and kills SIPp (process
    group, SIGTERM then SIGKILL) if it is still running after ``timeout`` seconds.
    """
    reason = sipp_unavailable_reason()
    if reason:
        raise FileNotFoundError(reason)
    cwd = Path(cwd).absolute()
    cwd.mkdir(parents=True, exist_ok=True)
    tag = name or f"sipp{next(_counter)}"
    argv, stat, err = _harness_args(args, cwd, tag, recv_timeout_ms, stat_interval)
    for p in (stat, err):
        p.unlink(missing_ok=True)
    log_path = cwd / f"{tag}.log"
    log_path.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = spawn([SIPP, *argv], cwd=cwd, log_path=log_path, netns=netns, name=tag)
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        rc = proc.stop(grace=3.0)
    if timed_out:
        rc = proc.returncode
    duration = time.monotonic() - t0
    last, rows = parse_stat_csv(stat)
    log = proc.log_text()
    errs = _read(err)
    if errs.strip():
        log += f"\n--- {err.name} (tail) ---\n" + "\n".join(errs.splitlines()[-60:])
    return SippResult(argv=netns_prefix(netns) + [SIPP, *argv], returncode=rc, timed_out=timed_out,
                      duration=duration, stats=last, rows=rows, log=log, stat_path=stat, error_path=err)


class SippProcess(ManagedProcess):
    """A background SIPp (see :func:`start_sipp`)."""

    stat_path: Path
    error_path: Path

    def quit(self, grace: float = 5.0) -> int | None:
        """Ask SIPp to finish softly (SIGUSR1 = 'q'), then stop it (group kill fallback)."""
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGUSR1)
                self.popen.wait(grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        return self.stop(grace=2.0)

    def result(self) -> SippResult:
        """Statistics so far (the CSV is written every ``stat_interval`` s and at exit)."""
        last, rows = parse_stat_csv(self.stat_path)
        log = self.log_text()
        errs = _read(self.error_path)
        if errs.strip():
            log += f"\n--- {self.error_path.name} (tail) ---\n" + "\n".join(errs.splitlines()[-60:])
        return SippResult(argv=self.full_argv, returncode=self.returncode, timed_out=False,
                          duration=time.monotonic() - self.started_at, stats=last, rows=rows,
                          log=log, stat_path=self.stat_path, error_path=self.error_path)


def start_sipp(args: Sequence[str], *, cwd: str | os.PathLike, netns: object | None = None,
               name: str | None = None, recv_timeout_ms: int | None = None,
               stat_interval: int | None = 1, wait_bound: tuple[str, int] | None = None,
               timeout: float = 10.0) -> SippProcess:
    """Start a background SIPp (e.g. ``-sf uas_rr.xml -p PORT``) as a managed process.

    It is stopped by test teardown; call ``.quit()`` / ``.stop()`` earlier and ``.result()``
    for its statistics. With ``wait_bound=(host, port)`` waits until its UDP socket is bound.
    """
    reason = sipp_unavailable_reason()
    if reason:
        raise FileNotFoundError(reason)
    cwd = Path(cwd).absolute()
    cwd.mkdir(parents=True, exist_ok=True)
    tag = name or f"sipp{next(_counter)}"
    argv, stat, err = _harness_args(args, cwd, tag, recv_timeout_ms, stat_interval)
    for p in (stat, err):
        p.unlink(missing_ok=True)
    log_path = cwd / f"{tag}.log"
    log_path.unlink(missing_ok=True)
    proc = SippProcess([SIPP, *argv], cwd=cwd, log_path=log_path, netns=netns, name=tag)
    proc.stat_path, proc.error_path = stat, err
    REGISTRY.add(proc)
    if wait_bound:
        try:
            wait_udp_listening(wait_bound[0], int(wait_bound[1]), netns, timeout, proc=proc)
        except BaseException:
            proc.stop()
            raise
    return proc


def sipp_args(scenario_name: str | os.PathLike, remote: str | None = None, *, local_ip: str = "127.0.0.1",
              local_port: int | None = None, calls: int | None = None, rate: float | None = None,
              extra: Iterable[str] = ()) -> list[str]:
    """Small convenience builder: ``-sf SCEN [REMOTE] -i IP [-p PORT] [-m N] [-r R] EXTRA``."""
    sf = Path(scenario_name)
    if not sf.exists():
        sf = scenario(str(scenario_name))
    a = ["-sf", str(sf)]
    if remote:
        a.append(remote)
    a += ["-i", local_ip]
    if local_port:
        a += ["-p", str(local_port)]
    if calls is not None:
        a += ["-m", str(calls)]
    if rate is not None:
        a += ["-r", str(rate)]
    return a + list(extra)

