"""Why an agent stops early, as a message for people and an exit code for scripts."""

from __future__ import annotations

import enum
import signal


class Exit(enum.IntEnum):
    """Exit codes of `sipmesh serve`, `sipmesh call` and `sip_app`."""

    OK = 0
    FAILURE = 1        # anything else (and sip_app's usage errors, as in the prototype)
    USAGE = 2          # bad command line (argparse's code)
    PROGRAM = 3        # the program to run is missing or not executable
    UNREACHABLE = 4    # the SIP server does not answer, or we cannot listen
    AUTH = 5           # the SIP server rejected our credentials
    NOT_FOUND = 6      # the target is not registered (404, 480, 604)
    BUSY = 7           # the target is in another session (486, 600)
    NO_ANSWER = 8      # no final answer in time (408, our timeout)
    REFUSED = 9        # the session was refused: 488, bad parameters either way, other errors
    APPLICATION = 10   # the session ran, but our program ended it by failing (non-zero, signal)
    UNTRUSTED = 11     # TLS: we refused the SIP server's certificate (wrong CA or name)
    PEER_LOST = 12     # the session ran, but the peer stopped answering (no BYE): we ended it
    NO_PATH = 13       # no network path to the peer: ICE found none (nothing was started)


EXIT_HELP = """exit status:
  0  the session ran and ended: our program exited 0, or the peer ended the session
     (BYE) or we were told to stop (signal) and we stopped the program
     (serve: stopped by a signal, whatever its sessions' programs did)
  2  bad command line
  3  the program to run is missing or not executable
  4  the SIP server is unreachable (or the SIP port cannot be bound)
  5  the SIP server rejected the credentials
  6  the target is not registered
  7  the target is busy
  8  the target did not answer in time
  9  the session was refused (e.g. parameters that do not validate)
 10  the session ran, but our program failed: it exited non-zero or was killed by a
     signal we did not send (call, serve --once; the program's own status is printed)
 11  TLS: the SIP server's certificate was refused (not signed by a trusted CA, or
     not for the server's name)
 12  the session ran, but the peer stopped answering without ending it (its agent or
     host died, or the path to it was cut: SIP probes unanswered, or nothing came on
     the ICE path for the consent timeout): we stopped the program (call, serve --once)
 13  no network path to the peer: every ICE check failed (the message lists the
     candidates, the checks and why); nothing was started
  1  any other failure"""


# What to do next, for the messages of more than one failure.
CHECK_CREDENTIALS = ("check the password (--password, --credentials FILE or $SIPMESH_PASSWORD; "
                     "daemon: [agent] password or credentials) and the user name (--user, "
                     "--auth-user)")
CHECK_SERVER = ("check --server (host and port) and --transport, and that the SIP server "
                "runs (sipmesh broker, or your registrar)")


class AgentError(Exception):
    """A failure the agent reports and exits on."""

    def __init__(self, message: str, code: Exit = Exit.FAILURE) -> None:
        super().__init__(message)
        self.code = code


class ProfileError(AgentError):
    """An application profile cannot do what a session needs (program, port, files)."""


class Exhausted(ProfileError):
    """No free port or address for one more session now: the INVITE gets 486 Busy Here."""


def describe_exit(status: int) -> str:
    """How a program ended, from its exit status (negative: killed by that signal)."""
    if status >= 0:
        return f"exited with status {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    return f"was killed by {name}"


def exit_for_status(status: int) -> Exit:
    """The exit code for a final SIP status that ended an INVITE."""
    if status in (401, 403, 407):
        return Exit.AUTH
    if status in (404, 480, 484, 604):
        return Exit.NOT_FOUND
    if status in (486, 600):
        return Exit.BUSY
    if status in (408, 487):
        return Exit.NO_ANSWER
    if status in (503,) or status >= 700:
        return Exit.UNREACHABLE
    return Exit.REFUSED


def describe_status(status: int, reason: str, target: str) -> str:
    """A sentence for a failed INVITE."""
    if status in (404, 604):
        return (f"{target} is not registered at the SIP server ({status} {reason}): check the "
                "name, and that its agent (sipmesh serve or daemon) runs and registered at "
                "the same server")
    if status == 480:
        return (f"{target} is not reachable now ({status} {reason}): its agent is not "
                "registered at the moment; start it, or try again later")
    if status in (486, 600):
        return (f"{target} is busy in another session ({status} {reason}): try again later "
                "(sipmesh serve answers one session at a time, sipmesh daemon many)")
    if status == 408:
        return (f"{target} did not answer ({status} {reason}): is its agent running and "
                "reachable from the SIP server?")
    if status in (401, 407):
        return f"the SIP server rejected our credentials ({status} {reason}): {CHECK_CREDENTIALS}"
    if status == 403:
        return (f"the SIP server refused the call ({status} {reason}): it may take calls only "
                f"from its own users, with their password: {CHECK_CREDENTIALS}")
    if status == 503:
        return f"the SIP server is unreachable or unavailable ({status} {reason}): {CHECK_SERVER}"
    return f"{target} refused the session ({status} {reason}): its agent's log says why"
