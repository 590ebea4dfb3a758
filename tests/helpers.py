"""Shared test helpers: configs in tmp dirs, the relay as a subprocess, the CLI, SMTP clients.

Everything here talks only to 127.0.0.1 and picks ports with port 0 (or `free_port()` when a
subprocess needs its port before it starts). The fixtures in conftest.py are thin wrappers
around these functions, so tests that need them outside a fixture can call them directly.

Configs: `config_data(directory, **overrides)` is config.example.toml with the listen address
on 127.0.0.1:0 and every path inside `directory`, deep-merged with `overrides` (one keyword
per top-level section; a dict merges into that section, anything else replaces it, None
deletes the key). `write_config` writes it with `toml_dumps`, a small TOML writer that also
writes invalid values, which the config tests need.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import io
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, Protocol, TypeVar

import aiosmtplib
import pytest
import trustme

from relay.config import LoadedConfig, load_config

if TYPE_CHECKING:
    from relay.server import Relay

T = TypeVar("T")

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = REPO / "config.example.toml"
DEFAULT_CONFIG = REPO / "relay" / "default_config.toml"

# The relay's final DATA reply (Exchange Online's wording); group 1 is the queue id.
QUEUED_RE = re.compile(r"^250 2\.6\.0 <[^>]+> \[InternalId=(\d+)\] Queued mail for delivery$")


class MakeConfig(Protocol):
    """The `make_config` fixture's type (for annotating tests)."""

    def __call__(self, *, name: str = "config.toml", **overrides: Any) -> Path: ...


class StartRelay(Protocol):
    """The `start_relay` fixture's type (for annotating tests)."""

    def __call__(
        self, *, config_path: Path | None = None, run_worker: bool = False, **overrides: Any
    ) -> Awaitable[Relay]: ...


# ---- configs ----------------------------------------------------------------------------


def example_data() -> dict[str, Any]:
    """config.example.toml as a dict (a fresh copy each call)."""
    return tomllib.loads(EXAMPLE_CONFIG.read_text("utf-8"))


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge: dicts merge key by key, None deletes the key, anything else replaces."""
    result = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def config_data(directory: Path, **overrides: Any) -> dict[str, Any]:
    """The example config, listening on 127.0.0.1:0, with its files inside `directory`."""
    base = merge(
        example_data(),
        {
            "smtp": {"listen": f"{HOST}:0"},
            "queue": {"path": str(directory / "queue" / "relay.db")},
            "mailboxes": {"path": str(directory / "queue" / "mailboxes")},
        },
    )
    return merge(base, overrides)


def write_config(directory: Path, *, name: str = "config.toml", **overrides: Any) -> Path:
    """Write `config_data(directory, **overrides)` to directory/name and return the path.

    Example: `write_config(tmp_path, smtp={"max_recipients": 3, "relay_networks": ["10.0.0.0/8"]})`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(toml_dumps(config_data(directory, **overrides)), "utf-8")
    return path


def load(path: Path) -> LoadedConfig:
    """The relay's own view of a config file (raises relay.errors.ConfigError)."""
    return load_config(str(path))


def listen_port(config_path: Path) -> int:
    """The port in a config file's [smtp].listen."""
    listen = tomllib.loads(config_path.read_text("utf-8"))["smtp"]["listen"]
    return int(listen.rpartition(":")[2])


def toml_dumps(data: Mapping[str, Any]) -> str:
    """A minimal TOML writer: scalars and lists first, then tables, then arrays of tables."""
    lines: list[str] = []
    _write_table(lines, [], data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _write_table(lines: list[str], path: list[str], table: Mapping[str, Any]) -> None:
    def is_table_array(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(i, Mapping) for i in v)

    plain = {k: v for k, v in table.items() if not isinstance(v, Mapping) and not is_table_array(v)}
    lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in plain.items())
    for key, value in table.items():
        if isinstance(value, Mapping):
            lines += ["", f"[{'.'.join(_toml_key(p) for p in [*path, key])}]"]
            _write_table(lines, [*path, key], value)
    for key, value in table.items():
        if is_table_array(value):
            for item in value:
                lines += ["", f"[[{'.'.join(_toml_key(p) for p in [*path, key])}]]"]
                _write_table(lines, [*path, key], item)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


# ---- TLS --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1, localhost and the relay's name."""

    ca: trustme.CA
    certificate: Path  # the leaf and its chain, PEM
    key: Path
    ca_file: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA (and verifies the name)."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def smtp_overrides(self, **extra: Any) -> dict[str, Any]:
        """The [smtp] override that turns STARTTLS on: `write_config(d, smtp=tls.smtp_overrides())`."""
        return {"tls_certificate": str(self.certificate), "tls_key": str(self.key), **extra}


def make_tls_files(directory: Path, *, hostname: str = "relay.contoso.test") -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert(HOST, "localhost", hostname)
    certificate, key, ca_file = directory / "lab.pem", directory / "lab.key", directory / "ca.pem"
    certificate.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca_file.write_bytes(ca.cert_pem.bytes())
    return TlsFiles(ca=ca, certificate=certificate, key=key, ca_file=ca_file)


# ---- bounded waits ----------------------------------------------------------------------
# For what takes real time: a subprocess, the network, another thread. Queue time (retries,
# expiry) moves with the relay's clock instead; no test waits for it.


def wait_for(check: Callable[[], T | None], *, timeout: float, what: str, step: float = 0.2) -> T:
    """Call `check` until it returns something truthy, and return that; fail after
    `timeout` seconds, saying `what` did not happen and what `check` said last."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g}s: {what} (last: {last!r})")
        time.sleep(step)


async def poll(
    check: Callable[[], T | Awaitable[T | None] | None],
    *,
    timeout: float = 10.0,
    what: str,
    step: float = 0.05,
) -> T:
    """`wait_for` for async tests: the event loop keeps running between the calls, and
    `check` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g}s: {what} (last: {last!r})")
        await asyncio.sleep(step)


# ---- programs and the CLI ---------------------------------------------------------------


# What swaks needs for --tls on Debian (its Recommends, left out by --no-install-recommends).
SWAKS_TLS_PACKAGES = "libnet-ssleay-perl libio-socket-ssl-perl"


def require_program(name: str) -> str:
    """The program's path; if missing, skip loudly (or fail when CI=true)."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} not installed; CI would FAIL here (apt-get install {name})")
    return path


def require_swaks_tls() -> str:
    """swaks' path, once `swaks --support` says it can do TLS; else skip loudly (or fail when
    CI=true) naming the Debian packages. Without them swaks fails at STARTTLS with an error
    that does not say what is missing."""
    path = require_program("swaks")
    support = subprocess.run(
        [path, "--support"], capture_output=True, text=True, timeout=30, check=False
    )
    report = support.stdout + support.stderr
    if not re.search(r"(?m)^\W*TLS supported", report):
        said = next((line.strip() for line in report.splitlines() if " TLS " in f" {line} "), "")
        missing(
            f"swaks cannot do TLS ({said or 'swaks --support does not list TLS'}); CI would "
            f"FAIL here (apt-get install {SWAKS_TLS_PACKAGES})"
        )
    return path


def missing(reason: str) -> NoReturn:
    """Something a test needs is not on this machine: fail when CI=true, else skip loudly."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


class CliResult(NamedTuple):
    code: int
    stdout: str
    stderr: str


def relay_command(*args: str, config: Path | str | None = None) -> list[str]:
    """`python -m relay [--config PATH] ARGS...` for subprocess."""
    command = [sys.executable, "-m", "relay"]
    if config is not None:
        command += ["--config", str(config)]
    return [*command, *args]


def cli_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without RELAY_CONFIG (unless given), plus `env`."""
    result = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    result.update(env or {})
    return result


def run_cli(
    *args: str,
    config: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    timeout: float = 30,
) -> CliResult:
    """Run `python -m relay [--config PATH] ARGS...`; returns (code, stdout, stderr).

    RELAY_CONFIG from the test's environment is dropped unless passed in `env`.
    In async tests, call it through `asyncio.to_thread` so an in-process relay keeps serving.
    """
    done = subprocess.run(
        relay_command(*args, config=config),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(env),
        cwd=cwd,
        check=False,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


def run_main(*args: str, config: Path | str | None = None) -> CliResult:
    """`relay [--config PATH] ARGS...` in this process: relay.cli.main, output captured.

    The same code as the subprocess without its half second of start-up; anything main()
    lets escape (what a user would see as a traceback) propagates and fails the test.
    It calls asyncio.run, so from an async test use `await asyncio.to_thread(run_main, ...)`.
    Not for concurrent use: it redirects the process's stdout and stderr.
    """
    from relay.cli import main

    argv = [*(["--config", str(config)] if config is not None else []), *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: --help, --version, usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return CliResult(code, out.getvalue(), err.getvalue())


def run_cli_many(*calls: Sequence[str], **kwargs: Any) -> list[CliResult]:
    """Several `run_cli(*call, **kwargs)` at once (each is mostly Python start-up time)."""
    with ThreadPoolExecutor(max(1, len(calls))) as pool:
        return list(pool.map(lambda call: run_cli(*call, **kwargs), calls))


# ---- the relay as a subprocess ----------------------------------------------------------


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now (for a subprocess that must know it up front)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def smtp_greets(host: str, port: int, *, timeout: float = 1.0) -> bool:
    """True when host:port accepts a connection and greets with 220."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            greeting = sock.makefile("rb").readline()
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
            return greeting.startswith(b"220")
    except OSError:
        return False


@dataclass
class RelayProcess:
    """`relay serve` in a subprocess; its stdout and stderr go to `log` (a file)."""

    process: subprocess.Popen[bytes]
    config: Path
    host: str
    port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text("utf-8", errors="replace")

    def kill(self) -> None:
        """SIGKILL, as `kill -9`: no cleanup runs."""
        self.signal(signal.SIGKILL)
        self.process.wait(10)

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise


def start_relay_process(
    config_path: Path, *, timeout: float = 15, env: Mapping[str, str] | None = None
) -> RelayProcess:
    """Start `python -m relay --config X serve` and wait (bounded) for its 220 greeting.

    The config must listen on a fixed port (`free_port()`), not 0. Stop it with `.stop()`
    or `.kill()`; use `relay_process()` to have that done for you.
    """
    port = listen_port(config_path)
    log = config_path.with_name(f"relay-serve-{port}.log")
    with log.open("wb") as out:
        process = subprocess.Popen(
            relay_command("serve", config=config_path),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=cli_env(env),
        )
    relay = RelayProcess(process=process, config=config_path, host=HOST, port=port, log=log)

    def greeted() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"relay serve exited with {process.returncode}:\n{relay.output()}")
        return smtp_greets(HOST, port)

    try:
        wait_for(greeted, timeout=timeout, what=f"relay serve greets on port {port}", step=0.05)
    except AssertionError:
        relay.kill()
        raise RuntimeError(
            f"relay serve did not greet on port {port} in {timeout}s:\n{relay.output()}"
        ) from None
    return relay


@contextlib.contextmanager
def relay_process(config_path: Path, **kwargs: Any) -> Iterator[RelayProcess]:
    """`start_relay_process` that is killed on the way out, whatever happens."""
    relay = start_relay_process(config_path, **kwargs)
    try:
        yield relay
    finally:
        if relay.process.poll() is None:
            relay.kill()


# ---- messages and SMTP clients ----------------------------------------------------------


def make_message(
    *,
    subject: str = "test",
    body: str = "hello\r\n",
    sender: str = "sender@fabrikam.test",
    to: str = "alice@contoso.test",
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """An RFC 5322 message with CRLF line ends (no Message-ID or Date unless in `headers`)."""
    lines = [f"From: {sender}", f"To: {to}", f"Subject: {subject}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")


def queued_id(reply: str) -> int:
    """The queue id in a `250 2.6.0 ... [InternalId=N] Queued mail for delivery` reply."""
    match = QUEUED_RE.match(reply)
    if match is None:
        raise AssertionError(f"not the relay's acceptance reply: {reply!r}")
    return int(match.group(1))


def reply_text(response: aiosmtplib.SMTPResponse) -> str:
    """A reply as one line, the way it came on the wire: "250 2.1.5 Recipient OK"."""
    return f"{response.code} {response.message}"


@contextlib.asynccontextmanager
async def smtp_client(
    port: int, *, host: str = HOST, ehlo: bool = True, timeout: float = 10, **kwargs: Any
) -> AsyncIterator[aiosmtplib.SMTP]:
    """A connected aiosmtplib client (no implicit STARTTLS), EHLO already sent by default."""
    client = aiosmtplib.SMTP(hostname=host, port=port, timeout=timeout, start_tls=False, **kwargs)
    await client.connect()
    try:
        if ehlo:
            await client.ehlo(hostname="client.fabrikam.test")
        yield client
    finally:
        client.close()


async def command(client: aiosmtplib.SMTP, line: str | bytes) -> aiosmtplib.SMTPResponse:
    """Send one raw command line (no CRLF) and return the reply, whatever its code."""
    return await client.execute_command(line.encode() if isinstance(line, str) else line)


async def send_data(client: aiosmtplib.SMTP, content: bytes) -> aiosmtplib.SMTPResponse:
    """DATA and the content (dot-stuffed by aiosmtplib); the final reply, whatever its code."""
    try:
        return await client.data(content)
    except aiosmtplib.SMTPResponseException as exc:
        return aiosmtplib.SMTPResponse(exc.code, exc.message)


async def send_mail(
    port: int,
    *,
    rcpt_tos: Sequence[str] = ("alice@contoso.test",),
    mail_from: str = "sender@fabrikam.test",
    content: bytes | None = None,
    host: str = HOST,
) -> str:
    """One complete transaction over a new connection; returns the final reply as one line."""
    async with smtp_client(port, host=host) as client:
        await client.mail(mail_from)
        for rcpt in rcpt_tos:
            await client.rcpt(rcpt)
        reply = await send_data(client, content or make_message(to=rcpt_tos[0]))
        await client.quit()
    return reply_text(reply)


def send_mail_sync(
    port: int,
    *,
    rcpt_tos: Sequence[str] = ("alice@contoso.test",),
    mail_from: str = "sender@fabrikam.test",
    content: bytes | None = None,
    host: str = HOST,
    timeout: float = 10,
) -> str:
    """`send_mail` with smtplib (for threads and subprocess relays); the final reply line."""
    with smtplib.SMTP(host, port, timeout=timeout) as client:
        client.ehlo("client.fabrikam.test")
        client.mail(mail_from)
        for rcpt in rcpt_tos:
            client.rcpt(rcpt)
        code, message = client.data(content or make_message(to=rcpt_tos[0]))
    return f"{code} {message.decode('utf-8', errors='replace')}"
