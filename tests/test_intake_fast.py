"""RelaySMTP fills aiosmtpd's method tables itself (relay.smtpd._method_names) instead of
letting aiosmtpd scan with dir()/inspect on every connection. These tests compare the
tables with what aiosmtpd's own constructor computes, so an aiosmtpd upgrade that changes
them fails here rather than in a lab."""

from __future__ import annotations

import asyncio

import pytest
from aiosmtpd.smtp import SMTP

from relay.intake import IntakeHandler
from relay.smtpd import RelaySMTP

KWARGS = dict(
    data_size_limit=1000,
    enable_SMTPUTF8=True,
    decode_data=False,
    hostname="relay.lab.test",
    ident="test",
    tls_context=None,
    require_starttls=False,
    timeout=300,
)


def _handler() -> IntakeHandler:
    return IntakeHandler(
        store=None,  # type: ignore[arg-type]
        clock=None,  # type: ignore[arg-type]
        policy=lambda: None,  # type: ignore[arg-type,return-value]
        hostname="relay.lab.test",
        max_recipients=10,
        message_expiration=60.0,
        require_tls=False,
    )


async def _pair() -> tuple[RelaySMTP, RelaySMTP, IntakeHandler]:
    loop = asyncio.get_running_loop()
    handler = _handler()
    fast = RelaySMTP(handler, loop=loop, **KWARGS)
    slow = RelaySMTP.__new__(RelaySMTP)
    slow._hooks_bound = True  # a full dir() for aiosmtpd's own scan
    SMTP.__init__(slow, handler, loop=loop, **KWARGS)
    return fast, slow, handler


@pytest.mark.asyncio
async def test_tables_match_aiosmtpd_own_constructor() -> None:
    fast, slow, handler = await _pair()
    # One attribute more, by design: the per-session command line limits (aiosmtpd's live
    # on the class, shared by every session).
    assert set(vars(fast)) == set(vars(slow)) | {"command_size_limits"}
    assert fast.command_size_limits is not SMTP.command_size_limits
    assert fast.event_handler is handler
    assert fast._handle_hooks == slow._handle_hooks
    assert set(fast._handle_hooks) == {"EHLO", "MAIL", "RCPT", "DATA"}
    assert fast._ehlo_hook_ver == slow._ehlo_hook_ver == "new"
    assert fast._smtp_methods.keys() == slow._smtp_methods.keys()
    for name, method in fast._smtp_methods.items():
        assert method.__self__ is fast
        assert method.__func__ is slow._smtp_methods[name].__func__
    # HELP lists what both tables hold
    listed = {n for n, m in fast._smtp_methods.items() if fast._syntax_available(m)}
    assert listed == {n for n, m in slow._smtp_methods.items() if slow._syntax_available(m)}
    assert "MAIL" in listed and fast._smtp_methods.get("NOSUCH") is None
    assert fast._auth_methods.keys() == slow._auth_methods.keys()
    for name, attr in fast._auth_methods.items():
        assert attr.is_builtin == slow._auth_methods[name].is_builtin
        assert attr.method.__self__ is fast
        assert attr.method.__func__ is slow._auth_methods[name].method.__func__


@pytest.mark.asyncio
async def test_dir_is_whole_after_construction() -> None:
    fast, _, _ = await _pair()
    names = dir(fast)
    assert "smtp_EHLO" in names and "push" in names


def test_four_argument_ehlo_hook_is_refused() -> None:
    class Old:
        async def handle_EHLO(self, server, session, envelope, hostname):  # type: ignore[no-untyped-def]
            return "250 old"

    from relay.smtpd import _method_names

    with pytest.raises(TypeError, match="5-argument"):
        _method_names(RelaySMTP, Old)


@pytest.mark.asyncio
async def test_idle_timeout_counts_from_the_last_command() -> None:
    """The session's idle timer (moved per command, re-armed when it fires early) still
    closes a silent client, and only once it has been silent for the whole timeout."""
    loop = asyncio.get_running_loop()
    handler = _handler()
    kwargs = {**KWARGS, "timeout": 0.4}
    server = await loop.create_server(
        lambda: RelaySMTP(handler, loop=loop, **kwargs), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"220 ")
        started = loop.time()
        for _ in range(4):  # 0.2 s apart: each NOOP moves the deadline past the old one
            await asyncio.sleep(0.2)
            writer.write(b"NOOP\r\n")
            assert (await reader.readline()).startswith(b"250 ")
        assert loop.time() - started >= 0.8  # longer than one timeout, still open
        silent = loop.time()
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the server
        assert 0.35 <= loop.time() - silent < 1.5
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
