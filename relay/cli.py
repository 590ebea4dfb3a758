"""The `relay` command line: argument parsing and printing; the work is done elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import shutil
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from relay import __version__, admin, mailbox_reader
from relay.clock import Clock, iso
from relay.config import ENV_VAR, DomainType, LoadedConfig, dump_toml, load_config
from relay.errors import ConfigError, RelayError, UnitError, UsageError
from relay.spool.protocol import Spool
from relay.spool.rows import ListFilter
from relay.spool.sqlite import open_spool
from relay.states import FINAL, UNFINISHED, Status
from relay.units import parse_duration
from relay.views import (
    alerts_table,
    connectors_table,
    digest_table,
    domains_table,
    mailbox_detail,
    mailbox_table,
    message_detail,
    message_json,
    queue_table,
    short_time,
)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
T = TypeVar("T")


class CommandError(RelayError):
    """A command that failed for a reason the CLI words itself (exit 1)."""


def _json_option(parser: argparse._ActionsContainer) -> None:
    """The one --json option: the command prints JSON instead of its table or sentence."""
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="mailflow-relay: a simulated Exchange Online cloud relay for mail test labs.",
        epilog=(
            f"The config is --config PATH, else ${ENV_VAR}, else ./config.toml, else the\n"
            "embedded default (config.example.toml).\n\n"
            "example:\n  relay --config lab.toml queue list"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-V", "--version", action="version", version=f"mailflow-relay {__version__}"
    )
    config_help = "the TOML config file (default: $RELAY_CONFIG, ./config.toml, or built in)"
    parser.add_argument("--config", metavar="PATH", help=config_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", parents=[common], help="run the relay (SMTP + delivery)")
    serve.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log both directions of every SMTP session (-vv: libraries' debug output too)",
    )
    serve.set_defaults(run=cmd_serve)

    health = commands.add_parser(
        "health", parents=[common], help="exit 0 if the SMTP port answers 220 and the queue opens"
    )
    health.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the greeting (default: 5)",
    )
    health.set_defaults(run=cmd_health)

    config = commands.add_parser("config", help="configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_commands.add_parser(
        "check", parents=[common], help="validate the config and print the effective values"
    )
    check.set_defaults(run=cmd_config_check)

    queue = commands.add_parser("queue", help="inspect and act on the queue")
    queue_commands = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    listing = queue_commands.add_parser(
        "list",
        parents=[common],
        help="mail not yet finished, mailq style (newest last); --all for everything kept",
    )
    states = ", ".join(s.value for s in Status)
    listing.add_argument(
        "--status",
        action="append",
        choices=[s.value for s in Status],
        metavar="STATUS",
        help=f"only messages with a recipient in this state (repeatable; one of {states})",
    )
    listing.add_argument(
        "--all", action="store_true", help="also finished mail (delivered, failed, expired)"
    )
    listing.add_argument(
        "--connector", metavar="NAME", help="only messages with a recipient on this route"
    )
    listing.add_argument("--from", dest="mail_from", metavar="ADDRESS", help="only this sender")
    listing.add_argument("--to", metavar="ADDRESS", help="only messages with this recipient")
    listing.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="at most N messages (the newest N; default: all)",
    )
    _json_option(listing)
    listing.set_defaults(run=cmd_queue_list)
    show = queue_commands.add_parser(
        "show", parents=[common], help="one message, its recipients and their attempt history"
    )
    show.add_argument("id", type=int, metavar="ID", help="the queue id (swaks' InternalId=N)")
    shown = show.add_mutually_exclusive_group()
    shown.add_argument(
        "--headers",
        action="store_true",
        help="the stored header block as it will be sent (postcat -h, exim -Mvh)",
    )
    shown.add_argument(
        "--raw", action="store_true", help="the whole stored message, as bytes (exim -Mvb)"
    )
    _json_option(shown)
    show.set_defaults(run=cmd_queue_show)
    digest = queue_commands.add_parser(
        "digest", parents=[common], help="one row per route and last error (Get-QueueDigest)"
    )
    _json_option(digest)
    digest.set_defaults(run=cmd_queue_digest)
    retry = queue_commands.add_parser(
        "retry", parents=[common], help="make queued mail due now (postqueue -f)"
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=int, nargs="?", metavar="ID", help="one message")
    which.add_argument("--connector", metavar="NAME", help="everything queued for a connector")
    which.add_argument("--all", action="store_true", help="everything queued")
    _json_option(retry)
    retry.set_defaults(run=cmd_queue_retry)
    for name, text in (
        ("expire", "expire now and send the NDR (postsuper -e)"),
        ("hold", "hold: neither tried nor expired until released (postsuper -h)"),
        ("release", "release a held message (postsuper -H)"),
        ("delete", "remove a message without an NDR (postsuper -d)"),
    ):
        action = queue_commands.add_parser(name, parents=[common], help=text)
        action.add_argument("id", type=int, metavar="ID", help="the queue id (swaks' InternalId=N)")
        _json_option(action)
        action.set_defaults(run=cmd_queue_action, action=name)

    alerts = commands.add_parser(
        "alerts", parents=[common], help="mail flow alerts per connector, with how to fix"
    )
    _json_option(alerts)
    alerts.set_defaults(run=cmd_alerts)
    alert_commands = alerts.add_subparsers(dest="alerts_command", metavar="ACTION")
    fix = alert_commands.add_parser(
        "fix-now",
        parents=[common],
        help="make the internal relay domains behind a connector authoritative (the seed's Fix now)",
    )
    fix.add_argument(
        "connector", metavar="CONNECTOR", help="the on-premises connector the alert names"
    )
    _json_option(fix)
    fix.set_defaults(run=cmd_fix_now)

    mailbox = commands.add_parser(
        "mailbox", help="read the local Maildirs (lab mail, NDRs, alerts)"
    )
    mailbox_commands = mailbox.add_subparsers(
        dest="mailbox_command", metavar="ACTION", required=True
    )
    mlist = mailbox_commands.add_parser(
        "list", parents=[common], help="the messages in the local mailboxes, oldest first"
    )
    mlist.add_argument(
        "address", nargs="?", metavar="ADDRESS", help="one mailbox (default: every mailbox)"
    )
    _json_option(mlist)
    mlist.set_defaults(run=cmd_mailbox_list)
    mshow = mailbox_commands.add_parser(
        "show",
        parents=[common],
        help="one message: its text and, for an NDR or DSN, its delivery status",
    )
    mshow.add_argument("address", metavar="ADDRESS", help="the mailbox, e.g. alice@contoso.test")
    mshow.add_argument("n", type=int, metavar="N", help="the message's number in `mailbox list`")
    mshown = mshow.add_mutually_exclusive_group()
    mshown.add_argument("--raw", action="store_true", help="the file's bytes as stored")
    _json_option(mshown)
    mshow.set_defaults(run=cmd_mailbox_show)

    domain = commands.add_parser("domain", help="accepted domains, with runtime changes")
    domain_commands = domain.add_subparsers(dest="domain_command", metavar="ACTION", required=True)
    dlist = domain_commands.add_parser("list", parents=[common], help="accepted domains")
    _json_option(dlist)
    dlist.set_defaults(run=cmd_domain_list)
    dset = domain_commands.add_parser(
        "set-type", parents=[common], help="make a domain authoritative or internal_relay"
    )
    dset.add_argument("domain", metavar="DOMAIN", help="an accepted domain")
    dset.add_argument(
        "type",
        choices=[t.value for t in DomainType],
        metavar="TYPE",
        help="authoritative | internal_relay",
    )
    dset.set_defaults(run=cmd_domain_set_type)
    dreset = domain_commands.add_parser(
        "reset", parents=[common], help="back to the config file's types"
    )
    dreset.add_argument("domain", nargs="?", metavar="DOMAIN", help="one domain (default: all)")
    dreset.set_defaults(run=cmd_domain_reset)

    connector = commands.add_parser("connector", help="outbound connectors, with runtime changes")
    connector_commands = connector.add_subparsers(
        dest="connector_command", metavar="ACTION", required=True
    )
    clist = connector_commands.add_parser("list", parents=[common], help="outbound connectors")
    _json_option(clist)
    clist.set_defaults(run=cmd_connector_list)
    for name, enabled, text in (
        ("enable", True, "enable a connector: mail for its domains goes through it again"),
        ("disable", False, "disable a connector: its mail then routes by MX (or another)"),
    ):
        toggle = connector_commands.add_parser(name, parents=[common], help=text)
        toggle.add_argument("name", metavar="NAME", help="the connector's name, as in the config")
        toggle.set_defaults(run=cmd_connector_toggle, enabled=enabled)
    creset = connector_commands.add_parser(
        "reset", parents=[common], help="back to the config file's enabled flags"
    )
    creset.add_argument("name", nargs="?", metavar="NAME", help="one connector (default: all)")
    creset.set_defaults(run=cmd_connector_reset)

    clock = commands.add_parser("clock", help="the lab's simulated clock")
    clock_commands = clock.add_subparsers(dest="clock_command", metavar="ACTION", required=True)
    cshow = clock_commands.add_parser("show", parents=[common], help="the relay's time and offset")
    _json_option(cshow)
    cshow.set_defaults(run=cmd_clock_show)
    cadvance = clock_commands.add_parser(
        "advance", parents=[common], help="move the relay's time forward, e.g. 48h"
    )
    cadvance.add_argument("duration", metavar="DURATION", help='e.g. "48h", "15m", "30s"')
    _json_option(cadvance)
    cadvance.set_defaults(run=cmd_clock_advance)
    creset_clock = clock_commands.add_parser("reset", parents=[common], help="back to real time")
    _json_option(creset_clock)
    creset_clock.set_defaults(run=cmd_clock_reset)

    lab = commands.add_parser("lab", help="the lab's built-in fault targets")
    lab_commands = lab.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    faults = lab_commands.add_parser(
        "faults",
        parents=[common],
        help="start one SMTP endpoint per failure mode and a lab DNS server; Ctrl-C stops",
    )
    faults.add_argument("--host", default="127.0.0.1", help="address to listen on (an IP)")
    faults.add_argument(
        "--base-port",
        type=int,
        default=None,
        metavar="N",
        help="first port (default: free ports chosen by the system)",
    )
    faults.add_argument(
        "--workdir",
        metavar="DIR",
        default=None,
        help="where the lab CA file is written (default: <spool>/lab)",
    )
    faults.add_argument(
        "--write-config",
        metavar="PATH",
        help="also write a complete relay config that uses these targets (see README)",
    )
    faults.set_defaults(run=cmd_lab_faults)
    _add_examples(parser, ("relay",))
    return parser


# One example per command, shown at the end of its --help (argparse's epilog).
EXAMPLES = {
    "relay serve": "relay --config lab.toml serve -v",
    "relay health": "relay health --timeout 2 && echo up",
    "relay config": "relay config check",
    "relay config check": "relay --config lab.toml config check",
    "relay queue": "relay queue list",
    "relay queue list": "relay queue list --status deferred --connector 'To on-premises'",
    "relay queue show": "relay queue show 1 --headers",
    "relay queue digest": "relay queue digest --json",
    "relay queue retry": "relay queue retry --connector 'To on-premises'",
    "relay queue expire": "relay queue expire 1",
    "relay queue hold": "relay queue hold 1",
    "relay queue release": "relay queue release 1",
    "relay queue delete": "relay queue delete 1",
    "relay alerts": "relay alerts --json",
    "relay alerts fix-now": "relay alerts fix-now 'To on-premises'",
    "relay mailbox": "relay mailbox list alice@contoso.test",
    "relay mailbox list": "relay mailbox list alice@contoso.test",
    "relay mailbox show": "relay mailbox show alice@contoso.test 1",
    "relay domain": "relay domain list",
    "relay domain list": "relay domain list --json",
    "relay domain set-type": "relay domain set-type onprem.contoso.test authoritative",
    "relay domain reset": "relay domain reset onprem.contoso.test",
    "relay connector": "relay connector list",
    "relay connector list": "relay connector list --json",
    "relay connector enable": "relay connector enable 'To on-premises'",
    "relay connector disable": "relay connector disable 'To on-premises'",
    "relay connector reset": "relay connector reset",
    "relay clock": "relay clock advance 48h",
    "relay clock show": "relay clock show",
    "relay clock advance": "relay clock advance 48h",
    "relay clock reset": "relay clock reset",
    "relay lab": "relay lab faults --base-port 2700 --write-config lab.toml",
    "relay lab faults": "relay lab faults --base-port 2700 --write-config lab.toml",
}


def _add_examples(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
    """Every command's --help ends with its example (the top level keeps its own epilog)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                command = (*path, name)
                child.epilog = f"example:\n  {EXAMPLES[' '.join(command)]}"
                child.formatter_class = argparse.RawDescriptionHelpFormatter
                _add_examples(child, command)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler: Callable[[argparse.Namespace, LoadedConfig], int] = args.run
    try:
        return handler(args, load_config(args.config))
    except RelayError as exc:  # every error the relay words for its user; no traceback
        for line in _message_lines(exc):
            print(f"relay: {line}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError | UsageError) else EXIT_FAIL
    except KeyboardInterrupt:
        return 130


def _message_lines(exc: RelayError) -> list[str]:
    """A config's problems one per line, each with the file it is in; else the message."""
    if isinstance(exc, ConfigError):
        return [f"{exc.source}: {problem}" for problem in exc.problems]
    return [str(exc)]


def _run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coro

    return asyncio.run(wrapper())


def cmd_serve(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from relay.logs import log_in_background
    from relay.server import serve

    listener = log_in_background(verbosity=args.verbose, format=loaded.config.log.format)
    _tune_gc()
    try:
        run_fast(serve(loaded))
    except RelayError:  # worded already (AlreadyRunning is an OSError as well)
        raise
    except OSError as exc:
        raise CommandError(
            f"cannot listen on {loaded.config.smtp.listen}: {exc.strerror or exc}; "
            "change [smtp].listen or stop what uses the port"
        ) from None
    finally:
        listener.stop()  # writes out what is still queued
    return EXIT_OK


def _tune_gc() -> None:
    """Every SMTP command allocates a few dozen short-lived objects; with the default
    threshold (700) the collector ran many times per message and scanned the modules and
    config loaded at start each time. Those are frozen out of its sight, and the youngest
    generation is collected ten times less often (reference counting frees nearly all of it
    anyway; only cycles wait for the collector)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)


def run_fast(main: Coroutine[Any, Any, None]) -> None:
    """Run the server on uvloop when it is installed (`pip install mailflow-relay[fast]`)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def cmd_config_check(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    print(f"# {loaded.source}: valid")
    print(dump_toml(loaded.config), end="")
    return EXIT_OK


def cmd_health(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from relay.health import check

    problem = _run(check(loaded, timeout=args.timeout))
    if problem:
        print(f"relay: unhealthy: {problem}", file=sys.stderr)
        return EXIT_FAIL
    print("healthy")
    return EXIT_OK


async def open_store(loaded: LoadedConfig) -> Spool | None:
    """The queue for reading, or None when the server has never created it."""
    path = loaded.path(loaded.config.queue.path)
    if not path.exists():
        return None
    return await open_spool(path, create=False)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def terminal_width() -> int | None:
    """The terminal's width when stdout is one (COLUMNS first, as shutil reads it); None
    for a pipe or a file, where tables are never wrapped or cut."""
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):
        tty = False
    return shutil.get_terminal_size().columns if tty else None


def list_filter(args: argparse.Namespace) -> ListFilter:
    """What `queue list` selects: unfinished mail unless --all or --status say otherwise."""
    if args.status:
        statuses: frozenset[Status] | None = frozenset(Status(s) for s in args.status)
    else:
        statuses = None if args.all else UNFINISHED
    return ListFilter(
        statuses=statuses, connector=args.connector, mail_from=args.mail_from, recipient=args.to
    )


def _nothing_listed(args: argparse.Namespace, where: ListFilter, loaded: LoadedConfig) -> str:
    """The sentence for an empty listing: what was asked, and which database was read."""
    selected = [
        f"{name} {value}"
        for name, value in (
            ("--connector", args.connector),
            ("--from", args.mail_from),
            ("--to", args.to),
        )
        if value is not None
    ]
    if args.status:
        selected.insert(0, "--status " + ",".join(args.status))
    if selected:
        head = "No messages match " + " ".join(selected)
    elif where.statuses is None:
        head = "The queue holds no messages, finished or not"
    else:
        head = "Mail queue is empty"
    hint = "" if args.all or args.status else "; `relay queue list --all` shows finished mail too"
    return f"{head}: read {_read(loaded)}{hint}"


def cmd_queue_list(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    where = list_filter(args)

    async def run() -> int:
        store = await open_store(loaded)
        note = ""
        clock = Clock()
        if store is None:
            messages = []
        else:
            try:
                messages = await store.list_messages(
                    where=where, limit=args.limit, newest=args.limit is not None
                )
                clock = await admin.clock_for(store)
                note = admin.clock_note(clock)
            finally:
                await store.close()
        if args.json:
            _print_json([message_json(m) for m in messages])
        else:
            print(
                queue_table(
                    messages,
                    now=clock.now(),
                    width=terminal_width(),
                    clock_note=note,
                    empty=_nothing_listed(args, where, loaded),
                )
            )
        return EXIT_OK

    return _run(run())


def cmd_queue_show(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    async def run() -> int:
        store = await open_store(loaded)
        message = None
        clock = Clock()
        if store is not None:
            try:
                message = await store.get_message(args.id, history=True)
                clock = await admin.clock_for(store)
            finally:
                await store.close()
        if message is None:
            raise CommandError(
                f"no message with ID {args.id} in the queue {_read(loaded)} "
                "(see `relay queue list --all`)"
            )
        if args.headers or args.raw:
            await _print_content(loaded, args.id, headers_only=args.headers)
        elif args.json:
            _print_json(message_json(message, history=True))
        else:
            print(message_detail(message, now=clock.now(), width=terminal_width()))
        return EXIT_OK

    return _run(run())


async def _print_content(loaded: LoadedConfig, message_id: int, *, headers_only: bool) -> None:
    store = await open_store(loaded)
    assert store is not None  # the message was just read from it
    try:
        data = await store.content(message_id)
    finally:
        await store.close()
    if headers_only:
        end = data.find(b"\r\n\r\n")
        data = data if end < 0 else data[: end + 2]
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _read(loaded: LoadedConfig) -> str:
    """Which config and database a command read, for the sentences that found nothing."""
    return f"{loaded.path(loaded.config.queue.path)} (config: {loaded.source})"


def _mailbox_root(loaded: LoadedConfig) -> Path:
    return loaded.path(loaded.config.mailboxes.path)


def cmd_mailbox_list(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    root = _mailbox_root(loaded)
    names = [args.address.lower()] if args.address else mailbox_reader.addresses(root)
    entries = [e for name in names for e in mailbox_reader.list_mailbox(root, name)]
    if args.json:
        _print_json([e.to_json() for e in entries])
    elif not entries:
        which = f"the mailbox {args.address}" if args.address else "any mailbox"
        print(f"No mail in {which} under {root} (config: {loaded.source})")
    else:
        print(mailbox_table(entries))
    return EXIT_OK


def cmd_mailbox_show(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    root = _mailbox_root(loaded)
    file = mailbox_reader.message_file(root, args.address, args.n)
    if file is None:
        count = len(mailbox_reader.list_mailbox(root, args.address))
        raise CommandError(
            f"no message {args.n} in the mailbox {args.address} under {root} "
            f"(config: {loaded.source}); it holds {count} (see `relay mailbox list`)"
        )
    if args.raw:
        sys.stdout.buffer.write(file.read_bytes())
        sys.stdout.buffer.flush()
        return EXIT_OK
    rendered = mailbox_reader.render(root, args.address, args.n)
    assert rendered is not None
    if args.json:
        _print_json(rendered.to_json())
    else:
        print(mailbox_detail(rendered))
    return EXIT_OK


async def writable_store(loaded: LoadedConfig) -> Spool:
    """The queue for an action; created if the server has never run (the action waits)."""
    return await open_spool(loaded.path(loaded.config.queue.path))


def _with_store(
    loaded: LoadedConfig, work: Callable[[Spool], Awaitable[T]], *, write: bool = True
) -> T | None:
    async def run() -> T | None:
        store = await (writable_store(loaded) if write else open_store(loaded))
        if store is None:
            return None
        try:
            return await work(store)
        finally:
            await store.close()

    return _run(run())


def cmd_queue_digest(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    async def work(store: Spool) -> tuple[list[Any], Clock]:
        return await store.digest(), await admin.clock_for(store)

    rows, clock = _with_store(loaded, work, write=False) or ([], Clock())
    if args.json:
        _print_json([admin.digest_json(r) for r in rows])
    else:
        table = digest_table(
            [admin.digest_json(r) for r in rows],
            now=clock.now(),
            width=terminal_width(),
            clock_note=admin.clock_note(clock),
            empty=f"Nothing pending: read {_read(loaded)}",
        )
        print(table)
    return EXIT_OK


def cmd_queue_retry(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    if args.connector is not None:
        admin.connector_name(loaded, args.connector)

    async def work(store: Spool) -> tuple[int, list[Status]]:
        count = await admin.retry(store, message=args.id, connector=args.connector)
        if count or args.id is None:
            return count, []
        message = await store.get_message(args.id)
        return count, [r.status for r in message.recipients] if message else []

    count, left = _with_store(loaded, work) or (0, [])
    if left:  # one message, and nothing of it could be made due
        states = ", ".join(sorted({s.value for s in left}))
        finished = all(s in FINAL for s in left)
        raise CommandError(
            f"message {args.id} is finished ({states}): there is nothing to retry"
            if finished
            else f"message {args.id}: nothing to retry ({states}; `relay queue release` a held one)"
        )
    target = (
        f"message {args.id}"
        if args.id is not None
        else (f"connector {args.connector!r}" if args.connector else "the whole queue")
    )
    text = f"{count} recipient(s) of {target} due now"
    if not count:
        text += f" (nothing is waiting in {_read(loaded)})"
    _report(args, {"action": "retry", "recipients": count}, text)
    return EXIT_OK


_ACTIONS = {
    "expire": (admin.expire, "expired; the NDR follows within seconds"),
    "hold": (admin.hold, "held"),
    "release": (admin.release, "released and due now"),
    "delete": (admin.delete, "deleted without an NDR"),
}


def cmd_queue_action(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    action, done = _ACTIONS[args.action]

    async def work(store: Spool) -> int:
        return await action(store, args.id)

    count = _with_store(loaded, work) or 0
    what = "message" if args.action == "delete" else "recipient(s)"
    _report(
        args,
        {"action": args.action, "id": args.id, "changed": count},
        f"message {args.id}: {count} {what} {done}"
        if count
        else f"message {args.id}: nothing to {args.action} (no recipient in a state that allows "
        f"it; read {_read(loaded)})",
    )
    return EXIT_OK


def _report(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        _print_json(data)
    else:
        print(text)


def cmd_alerts(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    async def work(store: Spool) -> tuple[list[Any], Clock]:
        return await admin.current_alerts(store, loaded), await admin.clock_for(store)

    current, clock = _with_store(loaded, work, write=False) or ([], Clock())
    if args.json:
        _print_json([a.to_json() for a in current])
    elif not current:
        print(
            "No mail flow alerts: no connector has mail deferred with a mail flow code "
            f"(read {_read(loaded)})"
        )
    else:
        print(alerts_table([a.to_json() for a in current], now=clock.now(), width=terminal_width()))
    return EXIT_OK


def cmd_fix_now(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    async def work(store: Spool) -> list[str]:
        return await admin.fix_now(store, loaded, args.connector)

    changed = _with_store(loaded, work) or []
    _report(
        args,
        {"connector": args.connector, "authoritative": changed},
        "Fix now: " + ", ".join(changed) + " now authoritative; mail to addresses that do not "
        "exist there is rejected with 550 5.4.1, and queued mail for them fails with an NDR. "
        "Undo with `relay domain reset`.",
    )
    return EXIT_OK


def cmd_domain_list(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    async def work(store: Spool) -> list[Any]:
        return await admin.domains(store, loaded)

    views = _with_store(loaded, work)
    if views is None:  # no queue yet: the config file's values are the effective ones
        views = [
            admin.DomainView(d.name, d.type, d.type, tuple(d.mailboxes))
            for d in loaded.config.accepted_domains
        ]
    if args.json:
        _print_json([v.to_json() for v in views])
    else:
        print(domains_table([v.to_json() for v in views], width=terminal_width()))
    return EXIT_OK


def cmd_domain_set_type(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    kind = DomainType(args.type)

    async def work(store: Spool) -> str:
        return await admin.set_domain_type(store, loaded, args.domain, kind)

    domain = _with_store(loaded, work)
    print(
        f"{domain} is now {kind.value} (the config file says otherwise until `relay domain reset`)"
        if kind is not _config_domain_type(loaded, domain)
        else f"{domain} is {kind.value}"
    )
    return EXIT_OK


def _config_domain_type(loaded: LoadedConfig, name: str | None) -> DomainType | None:
    return next((d.type for d in loaded.config.accepted_domains if d.name == name), None)


def cmd_domain_reset(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    async def work(store: Spool) -> list[str]:
        return await admin.reset_domains(store, loaded, args.domain)

    names = _with_store(loaded, work) or []
    print("back to the config file: " + ", ".join(names))
    return EXIT_OK


def cmd_connector_list(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    async def work(store: Spool) -> list[Any]:
        return await admin.connectors(store, loaded)

    views = _with_store(loaded, work) or []
    if args.json:
        _print_json([v.to_json() for v in views])
    else:
        print(connectors_table([v.to_json() for v in views], width=terminal_width()))
    return EXIT_OK


def cmd_connector_toggle(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    async def work(store: Spool) -> str:
        return await admin.set_connector_enabled(store, loaded, args.name, args.enabled)

    name = _with_store(loaded, work)
    print(f"connector {name!r} {'enabled' if args.enabled else 'disabled'}")
    return EXIT_OK


def cmd_connector_reset(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    async def work(store: Spool) -> list[str]:
        return await admin.reset_connectors(store, loaded, args.name)

    names = _with_store(loaded, work) or []
    print("back to the config file: " + ", ".join(repr(n) for n in names))
    return EXIT_OK


def _clock_json(clock: Any) -> dict[str, Any]:
    import time

    return {
        "now": iso(clock.now()),
        "real_now": iso(time.time()),
        "offset_seconds": clock.offset,
    }


def _print_clock(args: argparse.Namespace, clock: Any) -> None:
    if args.json:
        _print_json(_clock_json(clock))
    else:
        print(f"relay time: {short_time(clock.now())}")
        print(admin.clock_note(clock) or "the lab clock is not offset (real time)")


def cmd_clock_show(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    clock = _with_store(loaded, admin.clock_for, write=False)
    _print_clock(args, clock if clock is not None else Clock())
    return EXIT_OK


def cmd_clock_advance(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    try:
        seconds = parse_duration(args.duration)
    except UnitError as exc:
        raise UsageError(f"clock advance: {exc}") from None

    async def work(store: Spool) -> Any:
        return await admin.advance_clock(store, seconds)

    _print_clock(args, _with_store(loaded, work))
    return EXIT_OK


def cmd_clock_reset(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    _print_clock(args, _with_store(loaded, admin.reset_clock))
    return EXIT_OK


def cmd_lab_faults(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from relay.lab.config import lab_config, spool_dir
    from relay.lab.faults import FaultLab, run_lab_forever

    # The lab CA file goes to the spool of the config that will trust it: the written
    # config's own (lab-queue/lab), else the current config's.
    if args.workdir:
        workdir = Path(args.workdir)
    elif args.write_config:
        config_path = Path(args.write_config)
        workdir = config_path.parent / spool_dir(config_path) / "lab"
    else:
        workdir = loaded.path(loaded.config.queue.path).parent / "lab"
    workdir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def write_config(lab: FaultLab) -> None:
        if args.write_config:
            path = Path(args.write_config)
            spool = spool_dir(path)
            path.write_text(lab_config(loaded.config, lab, spool=spool), encoding="utf-8")
            print(
                f"# wrote {path}: relay --config {path} serve "
                f"(its queue and mailboxes: {path.parent / spool}/)",
                flush=True,
            )

    try:
        asyncio.run(
            run_lab_forever(
                host=args.host,
                base_port=args.base_port,
                workdir=workdir,
                out=sys.stdout,
                on_ready=write_config,
                print_config=not args.write_config,
            )
        )
    except OSError as exc:
        raise CommandError(f"cannot start the lab: {exc}; choose another --base-port") from None
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
