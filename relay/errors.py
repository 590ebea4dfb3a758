"""The relay's exceptions: one root, so the CLI catches them in one place.

As in aiosmtplib, an error that resembles a built-in one also inherits it, so callers that
only know the built-in still catch it. Every message says what is wrong and what to change;
the CLI prints it as one line ("relay: <message>") and exits 2 for a config or usage error,
1 for any other.

    RelayError              the root
    ├── ConfigError         the config cannot be used; a line per problem (exit 2)
    ├── UsageError          a command line argument cannot be used (exit 2)
    ├── UnitError           "48x" is not a duration or a size         + ValueError
    ├── StoreError          the spool could not do what was asked
    ├── DnsError            a name did not resolve; .failure says how
    │   └── DnsTimeout      ... because the lookup timed out          + TimeoutError
    ├── LabOptionError      a --host or --base-port the lab cannot use + ValueError
    ├── FaultUnavailable    a lab fault this machine cannot play      + RuntimeError
    ├── SessionBroken       (relay.agents.smtp) a destination session cannot go on
    │                       (.event: what happened on the wire)       + ConnectionError
    ├── AdminError          (relay.admin) names nothing that exists, or cannot be done
    ├── StartupError        (relay.server) the relay cannot start
    │   └── AlreadyRunning  another relay holds the queue's lock      + BlockingIOError
    └── CommandError        (relay.cli) a command failed (exit 1)

Those with a module named are defined in it, next to the only code that raises them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # relay.classify imports the codes table; this module stays a leaf
    from relay.classify import Failure


class RelayError(Exception):
    """Something the relay cannot do; the message says what and what to change."""


class ConfigError(RelayError):
    """A config that cannot be used; `problems` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


class UsageError(RelayError):
    """A command line argument that cannot be used, found after argparse has read it."""


class UnitError(RelayError, ValueError):
    """A duration ("48h") or a size ("35MB") that cannot be read. A ValueError too, so
    pydantic reports it as the value of the key it came from."""


class StoreError(RelayError):
    """The spool could not do what was asked (disk full, locked, corrupt, ...)."""


class DnsError(RelayError):
    """A name that did not resolve: `failure` is how (NXDOMAIN, SERVFAIL, no answer, a
    timeout), which classify turns into 4.4.312; the message is the detail recorded."""

    def __init__(self, failure: Failure, name: str, detail: str) -> None:
        super().__init__(detail)
        self.failure = failure
        self.name = name
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class DnsTimeout(DnsError, TimeoutError):
    """A lookup that got no answer within [dns].timeout."""


class LabOptionError(RelayError, ValueError):
    """An option of `relay lab faults` that cannot be used; the message names it."""


class FaultUnavailable(RelayError, RuntimeError):
    """A fault the lab cannot reproduce on this machine; the message says why."""
