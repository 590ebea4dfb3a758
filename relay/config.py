"""The relay's configuration: TOML in, one frozen, validated pydantic model out.

Every key name here is a contract with users (config.example.toml documents them). Unknown
keys are errors, so a misspelt key is reported by name instead of being silently ignored.
Field checks live on the models; checks that span several fields or sections live in
`_cross_check`, which reports each problem with the key it is about.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
)

from relay.errors import ConfigError, UnitError
from relay.net import split_host_port
from relay.units import format_duration, format_size, parse_duration, parse_size

DEFAULT_CONFIG_NAME = "config.toml"
ENV_VAR = "RELAY_CONFIG"


def _duration(value: Any) -> Any:
    """A duration is written with its unit: `message_expiration = 48` could be hours or
    seconds, so a bare number is refused, naming the units (as `relay clock advance 48`)."""
    if _bare_number(value):
        raise UnitError(
            f"{value!r} is a number without a unit; write it as a string with one of "
            f'ms, s, m, h, d, like "{value:g}h" or "{value:g}s"'
        )
    return parse_duration(value) if isinstance(value, str) else value


def _size(value: Any) -> Any:
    if _bare_number(value):
        raise UnitError(
            f"{value!r} is a number without a unit; write it as a string with one of "
            f'B, KB, MB, GB, KiB, MiB, GiB, like "{format_size(int(value))}"'
        )
    return parse_size(value) if isinstance(value, str) else value


def _bare_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


Duration = Annotated[
    float, BeforeValidator(_duration), Field(gt=0), PlainSerializer(format_duration)
]
Size = Annotated[int, BeforeValidator(_size), Field(gt=0), PlainSerializer(format_size)]
IPNetwork = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    BeforeValidator(lambda v: ipaddress.ip_network(v, strict=False) if isinstance(v, str) else v),
    PlainSerializer(str),
]

_DOMAIN = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?$"
)


def is_domain(name: str) -> bool:
    return bool(_DOMAIN.match(name))


def _address(value: str) -> str:
    local, at, domain = value.rpartition("@")
    if not at or not local or not is_domain(domain.lower()) or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not an e-mail address; write it as user@domain")
    return f"{local}@{domain.lower()}"


def _domain(value: str) -> str:
    name = value.lower().rstrip(".")
    if not is_domain(name):
        raise ValueError(f"{value!r} is not a domain name")
    return name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SmtpConfig(_Section):
    listen: str = "127.0.0.1:2525"
    hostname: str = "relay.contoso.test"
    max_message_size: Size = 35_000_000
    max_recipients: int = Field(default=500, gt=0)
    relay_networks: list[IPNetwork] = Field(
        default_factory=lambda: [
            ipaddress.ip_network("127.0.0.0/8"),
            ipaddress.ip_network("::1/128"),
        ]
    )
    tls_certificate: str = ""
    tls_key: str = ""
    require_tls: bool = False
    # RFC 5321 section 4.5.3.2.7: a server waits at least 5 minutes for the next command;
    # during DATA the wait is per read (section 4.5.3.2), not for the whole content.
    idle_timeout: Duration = 300.0
    # Open sessions at once, overall and per client address (0: no limit). 50 per client is
    # Postfix's smtpd_client_connection_count_limit. 500 overall: ten clients at their limit,
    # and with the worker's outbound connections still well under the usual soft limit of
    # 1024 open files (Postfix's default_process_limit allows 100 smtpd processes).
    max_connections: int = Field(default=500, ge=0)
    max_connections_per_client: int = Field(default=50, ge=0)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        split_host_port(value, default_port=None)
        return value

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        return _domain(value)

    @property
    def host(self) -> str:
        return split_host_port(self.listen, default_port=None)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen, default_port=None)[1]


class QueueConfig(_Section):
    path: str = "queue/relay.db"
    message_expiration: Duration = 48 * 3600.0
    retry_schedule: list[Duration] = Field(
        default_factory=lambda: [60.0, 300.0, 900.0, 1800.0, 3600.0], min_length=1
    )
    retention: Duration = 7 * 86400.0


class DnsConfig(_Section):
    nameservers: list[str] = Field(default_factory=list)
    timeout: Duration = 5.0

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, values: list[str]) -> list[str]:
        for value in values:
            host, _ = split_host_port(value, default_port=53)
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(
                    f"{value!r}: a nameserver is an IP address, optionally with a port "
                    '("127.0.0.1:5353", "[::1]:53")'
                ) from None
        return values


class MailboxesConfig(_Section):
    path: str = "queue/mailboxes"
    # The mailbox whose Maildir gets postmaster mail (RFC 5321 section 4.5.1); "" for
    # postmaster@<default domain>, where the relay's NDRs come from.
    postmaster: str = ""

    @field_validator("postmaster")
    @classmethod
    def _postmaster(cls, value: str) -> str:
        return _address(value) if value else value


class DomainType(StrEnum):
    AUTHORITATIVE = "authoritative"
    INTERNAL_RELAY = "internal_relay"


class AcceptedDomain(_Section):
    name: str
    type: DomainType = DomainType.AUTHORITATIVE
    mailboxes: list[str] = Field(default_factory=list)

    _name = field_validator("name")(classmethod(lambda cls, v: _domain(v)))

    @field_validator("mailboxes")
    @classmethod
    def _mailboxes(cls, values: list[str]) -> list[str]:
        return [_address(v) for v in values]


class TlsPolicy(StrEnum):
    NONE = "none"
    OPPORTUNISTIC = "opportunistic"
    ENCRYPTION_ONLY = "encryption_only"
    CERTIFICATE_VALIDATION = "certificate_validation"
    DOMAIN_VALIDATION = "domain_validation"


class ConnectorType(StrEnum):
    ON_PREMISES = "on_premises"
    PARTNER = "partner"


class Connector(_Section):
    # Exchange Online limits connector names to 64 characters.
    name: str = Field(min_length=1, max_length=64)
    type: ConnectorType = ConnectorType.ON_PREMISES
    recipient_domains: list[str] = Field(min_length=1)
    smart_hosts: list[str] = Field(default_factory=list)
    use_mx: bool = False
    tls: TlsPolicy = TlsPolicy.OPPORTUNISTIC
    tls_domain: str = ""
    ca_file: str = ""
    # Postfix's smtp_connect_timeout is 30s as well.
    connect_timeout: Duration = 30.0
    enabled: bool = True

    @field_validator("recipient_domains")
    @classmethod
    def _recipient_domains(cls, values: list[str]) -> list[str]:
        result = []
        for value in values:
            wildcard = value.startswith("*.")
            name = _domain(value[2:] if wildcard else value)
            result.append(f"*.{name}" if wildcard else name)
        return result

    @field_validator("smart_hosts")
    @classmethod
    def _smart_hosts(cls, values: list[str]) -> list[str]:
        for value in values:
            host, _ = split_host_port(value, default_port=25)
            try:
                ipaddress.ip_address(host)
            except ValueError:
                _domain(host)
        return values

    @property
    def destinations(self) -> list[tuple[str, int]]:
        """The smart hosts as (host, port), port 25 unless given."""
        return [split_host_port(h, default_port=25) for h in self.smart_hosts]


class AlertsConfig(_Section):
    notify: list[str] = Field(default_factory=list)
    # Exchange Online's "Messages have been delayed" alert: 200 messages, queued over an hour.
    threshold: int = Field(default=200, gt=0)
    after: Duration = 3600.0

    @field_validator("notify")
    @classmethod
    def _notify(cls, values: list[str]) -> list[str]:
        return [_address(v) for v in values]


class LogFormat(StrEnum):
    TEXT = "text"  # key=value lines, as Postfix's
    JSON = "json"  # one JSON object per line, the same fields


class LogConfig(_Section):
    format: LogFormat = LogFormat.TEXT


class Config(_Section):
    smtp: SmtpConfig = Field(default_factory=SmtpConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    dns: DnsConfig = Field(default_factory=DnsConfig)
    mailboxes: MailboxesConfig = Field(default_factory=MailboxesConfig)
    accepted_domains: list[AcceptedDomain] = Field(default_factory=list)
    connectors: list[Connector] = Field(default_factory=list)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @property
    def default_domain(self) -> str:
        """The tenant's default domain: the first authoritative one (NDRs come from there)."""
        for domain in self.accepted_domains:
            if domain.type is DomainType.AUTHORITATIVE:
                return domain.name
        return self.accepted_domains[0].name if self.accepted_domains else self.smtp.hostname

    @property
    def postmaster_mailbox(self) -> str:
        """The mailbox postmaster mail is delivered to ([mailboxes] postmaster)."""
        return self.mailboxes.postmaster or f"postmaster@{self.default_domain}"


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config and where it came from (relative paths are resolved against it)."""

    config: Config
    source: str  # a file path, or "(embedded default)"
    base_dir: Path

    def path(self, value: str) -> Path:
        return (self.base_dir / value).resolve() if value else Path()


def default_text() -> str:
    return resources.files("relay").joinpath("default_config.toml").read_text("utf-8")


def find_config(explicit: str | None) -> Path | None:
    """--config, then $RELAY_CONFIG, then ./config.toml; None means the embedded default."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    if Path(DEFAULT_CONFIG_NAME).is_file():
        return Path(DEFAULT_CONFIG_NAME)
    return None


def load_config(explicit: str | None = None) -> LoadedConfig:
    path = find_config(explicit)
    if path is None:
        return parse_config(default_text(), source="(embedded default)", base_dir=Path.cwd())
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(
            str(path),
            [f"cannot read the config file ({exc.strerror}); check --config / ${ENV_VAR}"],
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["the config file is not UTF-8 text"]) from None
    return parse_config(text, source=str(path), base_dir=path.resolve().parent)


def parse_config(text: str, *, source: str, base_dir: Path) -> LoadedConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(error, data) for error in exc.errors()]) from None
    loaded = LoadedConfig(config=config, source=source, base_dir=base_dir)
    problems = list(_cross_check(loaded))
    if problems:
        raise ConfigError(source, problems)
    return LoadedConfig(config=_absolute_paths(config, base_dir), source=source, base_dir=base_dir)


def _absolute_paths(config: Config, base_dir: Path) -> Config:
    """Every file path resolved against the config file's directory, once, here."""

    def absolute(value: str) -> str:
        return str((base_dir / value).resolve()) if value else value

    smtp = config.smtp.model_copy(
        update={
            "tls_certificate": absolute(config.smtp.tls_certificate),
            "tls_key": absolute(config.smtp.tls_key),
        }
    )
    return config.model_copy(
        update={
            "smtp": smtp,
            "queue": config.queue.model_copy(update={"path": absolute(config.queue.path)}),
            "mailboxes": config.mailboxes.model_copy(
                update={"path": absolute(config.mailboxes.path)}
            ),
            "connectors": [
                c.model_copy(update={"ca_file": absolute(c.ca_file)}) for c in config.connectors
            ],
        }
    )


def _key(loc: tuple[int | str, ...]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _lookup(data: Any, loc: tuple[int | str, ...]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        inner = getattr(annotation, "__args__", (annotation,))[0]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            model = inner
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return model


def _describe(error: Any, data: Any) -> str:
    loc = tuple(error["loc"])
    key = _key(loc)
    if error["type"] == "extra_forbidden":
        allowed = ", ".join(_model_at(loc[:-1]).model_fields)
        return f"{key}: unknown key; the keys allowed here are: {allowed}"
    if error["type"] == "missing":
        return f"{key}: missing; this key is required"
    value = _lookup(data, loc)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] in ("literal_error", "enum"):
        expected = error.get("ctx", {}).get("expected", "")
        message = f"must be one of {expected}".replace("'", "")
    return f"{key} = {_show(value)}: {message}"


def _show(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _duplicates(names: list[str]) -> set[str]:
    seen: set[str] = set()
    return {n for n in names if n in seen or seen.add(n)}  # type: ignore[func-returns-value]


def _is_local(address: str, config: Config, mailboxes: list[str]) -> bool:
    """A listed mailbox, or postmaster@ one of the accepted domains."""
    local, _, domain = address.lower().rpartition("@")
    if address.lower() in mailboxes:
        return True
    return local == "postmaster" and any(d.name == domain for d in config.accepted_domains)


def _cross_check(loaded: LoadedConfig) -> Iterator[str]:
    config = loaded.config
    smtp = config.smtp
    if bool(smtp.tls_certificate) != bool(smtp.tls_key):
        yield "smtp.tls_certificate / smtp.tls_key: set both (STARTTLS is offered) or neither"
    if smtp.require_tls and not smtp.tls_certificate:
        yield "smtp.require_tls = true: needs smtp.tls_certificate and smtp.tls_key to offer STARTTLS"
    for key in ("tls_certificate", "tls_key"):
        value = getattr(smtp, key)
        if value and not loaded.path(value).is_file():
            yield f"smtp.{key} = {_show(value)}: no such file ({loaded.path(value)})"

    if not any(d.type is DomainType.AUTHORITATIVE for d in config.accepted_domains):
        yield (
            "accepted_domains: at least one authoritative domain is required "
            "(NDRs come from postmaster@ that domain); add [[accepted_domains]] with "
            'type = "authoritative"'
        )
    for name in sorted(_duplicates([d.name for d in config.accepted_domains])):
        yield f"accepted_domains: the domain {_show(name)} is listed twice"
    all_mailboxes: list[str] = []
    for i, domain in enumerate(config.accepted_domains):
        for j, mailbox in enumerate(domain.mailboxes):
            all_mailboxes.append(mailbox.lower())
            if mailbox.rpartition("@")[2] != domain.name:
                yield (
                    f"accepted_domains[{i}].mailboxes[{j}] = {_show(mailbox)}: "
                    f"not in the domain {_show(domain.name)}; list it under its own domain"
                )
    for mailbox in sorted(_duplicates(all_mailboxes)):
        yield f"accepted_domains: the mailbox {_show(mailbox)} is listed twice"
    postmaster = config.mailboxes.postmaster
    if postmaster and not _is_local(postmaster, config, all_mailboxes):
        yield (
            f"mailboxes.postmaster = {_show(postmaster)}: not a mailbox; list it in its "
            "domain's accepted_domains[].mailboxes, name postmaster@<an accepted domain>, "
            'or leave it "" for postmaster@<default domain>'
        )

    for name in sorted(_duplicates([c.name for c in config.connectors])):
        yield f"connectors: the name {_show(name)} is used twice; connector names must be unique"
    for i, connector in enumerate(config.connectors):
        key = f"connectors[{i}]"
        if not connector.smart_hosts and not connector.use_mx:
            yield f"{key}: no smart_hosts and use_mx = false; list smart hosts or set use_mx = true"
        if connector.smart_hosts and connector.use_mx:
            yield f"{key}: smart_hosts and use_mx = true exclude each other; keep one"
        if connector.tls is TlsPolicy.DOMAIN_VALIDATION and not connector.tls_domain:
            yield f'{key}.tls_domain = "": required with tls = "domain_validation"'
        if connector.ca_file and not loaded.path(connector.ca_file).is_file():
            yield f"{key}.ca_file = {_show(connector.ca_file)}: no such file ({loaded.path(connector.ca_file)})"

    if not config.queue.path:
        yield 'queue.path = "": give the SQLite database a path, like "queue/relay.db"'


def dump_toml(config: Config) -> str:
    """The effective config as TOML, durations and sizes written the way users write them."""
    data = config.model_dump(mode="json")
    lines: list[str] = []
    for section in ("smtp", "queue", "dns", "mailboxes"):
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in data[section].items())
        lines.append("")
    for section in ("accepted_domains", "connectors"):
        for item in data[section]:
            lines.append(f"[[{section}]]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
            lines.append("")
    lines.append("[alerts]")
    lines.extend(f"{k} = {_toml_value(v)}" for k, v in data["alerts"].items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)
