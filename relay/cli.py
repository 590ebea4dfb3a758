"""The `relay` command line: argument parsing and printing; the work is done elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from relay import __version__
from relay.config import ENV_VAR, ConfigError, LoadedConfig, dump_toml, load_config
from relay.store import Status, Store, StoreError
from relay.views import message_detail, message_json, queue_table

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
T = TypeVar("T")


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit 1."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="mailflow-relay: a simulated Exchange Online cloud relay for mail test labs.",
        epilog=(
            f"The config is --config PATH, else ${ENV_VAR}, else ./config.toml, else the "
            "embedded default (config.example.toml)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"mailflow-relay {__version__}")
    config_help = "the TOML config file (default: $RELAY_CONFIG, ./config.toml, or built in)"
    parser.add_argument("--config", metavar="PATH", help=config_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", parents=[common], help="run the relay (SMTP + delivery)")
    serve.add_argument("-v", "--verbose", action="store_true", help="log every SMTP session")
    serve.set_defaults(run=cmd_serve)

    health = commands.add_parser(
        "health", parents=[common], help="exit 0 if the SMTP port answers 220 and the queue opens"
    )
    health.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
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
        "list", parents=[common], help="the queue, mailq style (newest last)"
    )
    listing.add_argument("--status", choices=[s.value for s in Status], help="only this state")
    listing.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="at most N messages (the newest N; default: all)",
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=cmd_queue_list)
    show = queue_commands.add_parser(
        "show", parents=[common], help="one message, its recipients and their attempt history"
    )
    show.add_argument("id", type=int, metavar="ID")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(run=cmd_queue_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        loaded = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"relay: {exc.source}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    handler: Callable[[argparse.Namespace, LoadedConfig], int] = args.run
    try:
        return handler(args, loaded)
    except (CommandError, StoreError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


def _run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coro

    return asyncio.run(wrapper())


def cmd_serve(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    from relay.server import AlreadyRunning, serve

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command log
    try:
        asyncio.run(serve(loaded))
    except AlreadyRunning as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(
            f"cannot listen on {loaded.config.smtp.listen}: {exc.strerror or exc}; "
            "change [smtp].listen or stop what uses the port"
        ) from None
    return EXIT_OK


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


async def open_store(loaded: LoadedConfig) -> Store | None:
    """The queue for reading, or None when the server has never created it."""
    path = loaded.path(loaded.config.queue.path)
    if not path.exists():
        return None
    return await Store.open(path, create=False)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def cmd_queue_list(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    async def run() -> int:
        store = await open_store(loaded)
        if store is None:
            messages = []
        else:
            try:
                status = Status(args.status) if args.status else None
                messages = await store.list_messages(
                    status=status, limit=args.limit, newest=args.limit is not None
                )
            finally:
                await store.close()
        if args.json:
            _print_json([message_json(m) for m in messages])
        else:
            print(queue_table(messages))
        return EXIT_OK

    return _run(run())


def cmd_queue_show(args: argparse.Namespace, loaded: LoadedConfig) -> int:
    async def run() -> int:
        store = await open_store(loaded)
        message = None
        if store is not None:
            try:
                message = await store.get_message(args.id, history=True)
            finally:
                await store.close()
        if message is None:
            raise CommandError(
                f"no message with ID {args.id} in the queue (see `relay queue list`)"
            )
        if args.json:
            _print_json(message_json(message, history=True))
        else:
            print(message_detail(message))
        return EXIT_OK

    return _run(run())


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
