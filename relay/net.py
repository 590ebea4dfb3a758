"""Host and port as text, both ways: "host:port" and "[v6]:port" parsed and written.

Exchange writes "<ip>:<port>", which is ambiguous for IPv6; the relay brackets IPv6
addresses as URLs do (RFC 3986 section 3.2.2): "[2001:db8::1]:25".
"""

from __future__ import annotations


def endpoint(host: str, port: int | None) -> str:
    """ "192.0.2.1:25", "[2001:db8::1]:25"; the host alone when there is no port."""
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(text: str, *, default_port: int | None) -> tuple[str, int]:
    """ "host:port", "[v6]:port", a bare host (with default_port) → (host, port)."""
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: write an IPv6 address as [::1]:25")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif text.count(":") > 1:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, as [::1]:25")
    if not host:
        raise ValueError(f"{text!r} has no host; write host:port")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} has no port; write host:port, like 127.0.0.1:2525")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)
