"""The config: the embedded default, where the file is found, every class of error (one line
each, exit 2, no traceback) and `relay config check`'s effective config."""

from __future__ import annotations

import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from relay.config import Config, default_text, load_config, parse_config
from relay.errors import ConfigError
from tests.helpers import (
    DEFAULT_CONFIG,
    EXAMPLE_CONFIG,
    CliResult,
    MakeConfig,
    example_data,
    run_cli,
    run_main,
    write_config,
)

pytestmark = pytest.mark.timeout(60)


def connector(**changes: Any) -> dict[str, Any]:
    """The example's connector with some keys changed."""
    return {**example_data()["connectors"][0], **changes}


def domains(*extra: dict[str, Any], first: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The example's accepted domains (the first one changed), then `extra`."""
    data = example_data()["accepted_domains"]
    return [{**data[0], **(first or {})}, data[1], *extra]


# ---- the embedded default -----------------------------------------------------------------


def test_embedded_default_is_the_example_byte_for_byte() -> None:
    assert DEFAULT_CONFIG.read_bytes() == EXAMPLE_CONFIG.read_bytes()
    assert default_text() == EXAMPLE_CONFIG.read_text("utf-8")


def test_embedded_default_parses() -> None:
    loaded = parse_config(default_text(), source="(embedded default)", base_dir=Path.cwd())
    config = loaded.config
    assert config.smtp.listen == "127.0.0.1:2525"
    assert config.smtp.max_message_size == 35_000_000
    assert config.queue.message_expiration == 48 * 3600
    assert config.queue.retry_schedule == [60, 300, 900, 1800, 3600]
    assert [d.name for d in config.accepted_domains] == ["contoso.test", "onprem.contoso.test"]
    assert [c.name for c in config.connectors] == ["To on-premises"]
    assert config.smtp.idle_timeout == 300
    assert config.smtp.max_connections_per_client == 50
    assert config.smtp.max_connections == 500
    assert config.mailboxes.postmaster == ""
    assert config.postmaster_mailbox == "postmaster@contoso.test"
    assert without_paths(config) == without_paths(
        Config.model_validate(tomllib.loads(EXAMPLE_CONFIG.read_text("utf-8")))
    )


def without_paths(config: Config) -> dict[str, Any]:
    """The config's values except the file paths (load_config makes those absolute)."""
    return config.model_dump(exclude={"queue": {"path"}, "mailboxes": {"path"}})


# ---- where the config comes from ----------------------------------------------------------


@pytest.fixture
def three_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """An explicit, an $RELAY_CONFIG and a ./config.toml file, told apart by smtp.hostname."""
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    paths = {}
    for name in ("explicit", "env", "cwd"):
        paths[name] = write_config(tmp_path / name, smtp={"hostname": f"{name}.contoso.test"})
    monkeypatch.chdir(tmp_path / "cwd")
    return paths


def hostname(explicit: Path | None = None) -> str:
    return load_config(str(explicit) if explicit else None).config.smtp.hostname


def test_explicit_config_beats_env_and_cwd(
    three_configs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_CONFIG", str(three_configs["env"]))
    assert hostname(three_configs["explicit"]) == "explicit.contoso.test"


def test_env_beats_cwd(three_configs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_CONFIG", str(three_configs["env"]))
    assert hostname() == "env.contoso.test"
    assert load_config(None).source == str(three_configs["env"])


def test_cwd_config_toml_without_env(three_configs: dict[str, Path]) -> None:
    assert hostname() == "cwd.contoso.test"


def test_embedded_default_without_any_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    loaded = load_config(None)
    assert loaded.source == "(embedded default)"
    assert without_paths(loaded.config) == without_paths(
        Config.model_validate(tomllib.loads(default_text()))
    )
    # Relative paths of the embedded default resolve against the working directory.
    assert loaded.path(loaded.config.queue.path) == tmp_path.resolve() / "queue" / "relay.db"
    assert Path(loaded.config.mailboxes.path) == tmp_path.resolve() / "queue" / "mailboxes"


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", queue={"path": "spool/relay.db"})
    loaded = load_config(str(path))
    expected = (tmp_path / "etc" / "spool" / "relay.db").resolve()
    assert loaded.path(loaded.config.queue.path) == expected


def test_cli_precedence(three_configs: dict[str, Path]) -> None:
    env = {"RELAY_CONFIG": str(three_configs["env"])}
    cwd = three_configs["cwd"].parent
    code, out, err = run_cli("config", "check", env=env, cwd=cwd)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"# {three_configs['env']}: valid"
    assert 'hostname = "env.contoso.test"' in out
    # --config is a global option and an option of each command.
    explicit = three_configs["explicit"]
    code, out, _ = run_cli("config", "check", "--config", str(explicit), env=env, cwd=cwd)
    assert code == 0
    assert 'hostname = "explicit.contoso.test"' in out
    empty = three_configs["cwd"].parent / "empty"
    empty.mkdir()
    code, out, _ = run_cli("config", "check", cwd=empty)
    assert out.splitlines()[0] == "# (embedded default): valid"


def test_config_option_before_or_after_the_command(
    three_configs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    explicit = str(three_configs["explicit"])
    for args in (
        ("--config", explicit, "config", "check"),
        ("config", "check", "--config", explicit),
    ):
        code, out, _ = run_main(*args)
        assert code == 0
        assert 'hostname = "explicit.contoso.test"' in out


# ---- errors: exit 2, one line per problem, no traceback --------------------------------------


def problem_lines(path: Path, result: CliResult) -> list[str]:
    """The problems `relay --config path config check` reported; it must have exited 2."""
    code, out, err = result
    assert "Traceback" not in err, err
    assert code == 2, (code, out, err)
    assert out == ""
    lines = err.splitlines()
    assert lines, "no problem reported"
    for line in lines:
        assert line.startswith(f"relay: {path}: "), line
    return [line.removeprefix(f"relay: {path}: ") for line in lines]


def check_problems(path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The problems relay.cli.main reports for `config check` (in process: fast)."""
    return problem_lines(path, run_main("config", "check", config=path))


# (test id, overrides, the text each problem line must contain, one list per line)
ERROR_CASES: list[tuple[str, dict[str, Any], list[list[str]]]] = [
    (
        "unknown key",
        {"smtp": {"lisen": "127.0.0.1:25"}},
        [["smtp.lisen", "unknown key", "listen", "max_message_size", "require_tls"]],
    ),
    (
        "unknown section",
        {"delivery": {"workers": 4}},
        [["delivery", "unknown key", "smtp", "queue", "connectors", "alerts"]],
    ),
    (
        "bad duration",
        {"queue": {"message_expiration": "48 hours"}},
        [["queue.message_expiration", '"48 hours"', "15m"]],
    ),
    (
        "bad duration in a list",
        {"queue": {"retry_schedule": ["1m", "soon"]}},
        [["queue.retry_schedule[1]", "soon"]],
    ),
    (
        "bare number as a duration",
        {"queue": {"message_expiration": 48}},
        [["queue.message_expiration = 48", "without a unit", "ms, s, m, h, d", '"48h"']],
    ),
    (
        "bare number in a duration list",
        {"queue": {"retry_schedule": ["1m", 300]}},
        [["queue.retry_schedule[1] = 300", "without a unit"]],
    ),
    (
        "bare number as a size",
        {"smtp": {"max_message_size": 35000000}},
        [["smtp.max_message_size = 35000000", "without a unit", "MB", '"35MB"']],
    ),
    (
        "bad size",
        {"smtp": {"max_message_size": "35 megs"}},
        [["smtp.max_message_size", '"35 megs"', "35MB"]],
    ),
    (
        "bad enum",
        {"connectors": [connector(tls="ssl")]},
        [
            [
                'connectors[0].tls = "ssl"',
                "none",
                "opportunistic",
                "encryption_only",
                "certificate_validation",
                "domain_validation",
            ]
        ],
    ),
    (
        "bad domain type",
        {"accepted_domains": domains(first={"type": "relay"})},
        [['accepted_domains[0].type = "relay"', "authoritative", "internal_relay"]],
    ),
    (
        "bad listen: no port",
        {"smtp": {"listen": "localhost"}},
        [['smtp.listen = "localhost"', "port"]],
    ),
    (
        "bad listen: bare IPv6",
        {"smtp": {"listen": "::1:25"}},
        [['smtp.listen = "::1:25"', "[::1]:25"]],
    ),
    ("bad listen: port", {"smtp": {"listen": "127.0.0.1:99999"}}, [["smtp.listen", "99999"]]),
    (
        "bad network",
        {"smtp": {"relay_networks": ["127.0.0.0/8", "10.0.0.0/33"]}},
        [['smtp.relay_networks[1] = "10.0.0.0/33"']],
    ),
    (
        "bad mailbox address",
        {"accepted_domains": domains(first={"mailboxes": ["alice"]})},
        [["accepted_domains[0].mailboxes", "'alice'", "user@domain"]],
    ),
    (
        "bad notify address",
        {"alerts": {"notify": ["nobody"]}},
        [["alerts.notify", "'nobody'", "user@domain"]],
    ),
    (
        "bad type",
        {"smtp": {"max_recipients": "many"}},
        [['smtp.max_recipients = "many"', "integer"]],
    ),
    (
        "connector without smart_hosts and use_mx",
        {"connectors": [connector(smart_hosts=[])]},
        [["connectors[0]", "smart_hosts", "use_mx"]],
    ),
    (
        "domain_validation without tls_domain",
        {"connectors": [connector(tls="domain_validation")]},
        [["connectors[0].tls_domain", "domain_validation"]],
    ),
    (
        "mailbox outside its domain",
        {
            "accepted_domains": domains(
                first={"mailboxes": ["alice@contoso.test", "bob@fabrikam.test"]}
            )
        },
        [['accepted_domains[0].mailboxes[1] = "bob@fabrikam.test"', '"contoso.test"']],
    ),
    (
        "duplicate connector names",
        {"connectors": [connector(), connector(recipient_domains=["fabrikam.test"])]},
        [["connectors", '"To on-premises"', "twice"]],
    ),
    (
        "duplicate domains",
        {"accepted_domains": domains({"name": "Contoso.Test", "type": "internal_relay"})},
        [["accepted_domains", '"contoso.test"', "twice"]],
    ),
    (
        "connector name longer than 64 characters",
        {"connectors": [connector(name="n" * 65)]},
        [[f'connectors[0].name = "{"n" * 65}"', "64"]],
    ),
    (
        "no authoritative domain",
        {"accepted_domains": domains()[1:], "alerts": {"notify": []}},
        [["accepted_domains", "authoritative"]],
    ),
    (
        "bad idle timeout",
        {"smtp": {"idle_timeout": "soon"}},
        [['smtp.idle_timeout = "soon"', "5m"]],
    ),
    (
        "negative connection limit",
        {"smtp": {"max_connections_per_client": -1}},
        [["smtp.max_connections_per_client = -1", "0"]],
    ),
    (
        "postmaster not an address",
        {"mailboxes": {"postmaster": "postmaster"}},
        [["mailboxes.postmaster", "'postmaster'", "user@domain"]],
    ),
    (
        "postmaster mailbox that is not a mailbox",
        {"mailboxes": {"postmaster": "ops@contoso.test"}},
        [['mailboxes.postmaster = "ops@contoso.test"', "accepted_domains", "mailboxes", '""']],
    ),
    (
        "two problems, two lines",
        {"smtp": {"max_message_size": "big"}, "queue": {"retention": "forever"}},
        [['smtp.max_message_size = "big"'], ['queue.retention = "forever"']],
    ),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_config_error(
    tmp_path: Path,
    overrides: dict[str, Any],
    expected: list[list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_config(tmp_path, name="bad.toml", **overrides)
    problems = check_problems(path, capsys)
    assert len(problems) == len(expected), problems
    for line, parts in zip(problems, expected, strict=True):
        for part in parts:
            assert part in line, f"{part!r} not in {line!r}"


def test_tls_certificate_without_tls_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "lab.pem").write_text("not checked here")
    path = write_config(tmp_path, name="bad.toml", smtp={"tls_certificate": "lab.pem"})
    [problem] = check_problems(path, capsys)
    assert "smtp.tls_certificate" in problem
    assert "smtp.tls_key" in problem


def test_tls_files_that_do_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(
        tmp_path, name="bad.toml", smtp={"tls_certificate": "lab.pem", "tls_key": "lab.key"}
    )
    problems = check_problems(path, capsys)
    assert len(problems) == 2, problems
    assert 'smtp.tls_certificate = "lab.pem"' in problems[0]
    assert "no such file" in problems[0]
    assert 'smtp.tls_key = "lab.key"' in problems[1]


def test_require_tls_without_a_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, name="bad.toml", smtp={"require_tls": True})
    [problem] = check_problems(path, capsys)
    assert "smtp.require_tls" in problem
    assert "tls_certificate" in problem


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nowhere.toml"
    [problem] = check_problems(path, capsys)
    assert "cannot read the config file" in problem
    assert "No such file" in problem


def test_invalid_toml_syntax(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[smtp\nlisten = "127.0.0.1:25"\n')
    [problem] = check_problems(path, capsys)
    assert "not valid TOML" in problem
    assert "line 1" in problem


def test_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[smtp]\nhostname = "r\xe9lay.test"\n')
    [problem] = check_problems(path, capsys)
    assert "UTF-8" in problem


def test_real_process_exits_2_without_traceback(tmp_path: Path) -> None:
    """The same checks through `python -m relay` subprocesses, a few classes at once."""
    cases: dict[str, dict[str, Any]] = {
        "unknown-key": {"smtp": {"lisen": "127.0.0.1:25"}},
        "cross-check": {"connectors": [connector(smart_hosts=[], tls="domain_validation")]},
        "two-problems": {"smtp": {"max_message_size": "big"}, "queue": {"retention": "forever"}},
    }
    paths = [write_config(tmp_path, name=f"{name}.toml", **o) for name, o in cases.items()]
    (tmp_path / "syntax.toml").write_text("[smtp\n")
    paths += [tmp_path / "syntax.toml", tmp_path / "missing.toml"]
    with ThreadPoolExecutor(len(paths)) as pool:
        results = list(pool.map(lambda p: run_cli("config", "check", config=p), paths))
    counts = [len(problem_lines(p, r)) for p, r in zip(paths, results, strict=True)]
    assert counts == [1, 2, 2, 1, 1]


def test_serve_with_a_bad_config_exits_2_too(tmp_path: Path) -> None:
    path = write_config(tmp_path, name="bad.toml", smtp={"max_message_size": "huge"})
    code, _, err = run_cli("serve", config=path, timeout=20)
    assert code == 2
    assert "Traceback" not in err
    assert 'smtp.max_message_size = "huge"' in err


def test_config_error_in_process_lists_problems(tmp_path: Path) -> None:
    path = write_config(tmp_path, queue={"retention": "1 week"}, alerts={"threshold": 0})
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.source == str(path)
    assert len(caught.value.problems) == 2
    assert any("alerts.threshold = 0" in p for p in caught.value.problems)


# ---- relay config check on a good file ----------------------------------------------------


def test_config_check_prints_the_effective_config(make_config: MakeConfig) -> None:
    path = make_config(queue={"retry_schedule": ["90s", "15m", "2h"], "retention": "14d"})
    code, out, err = run_cli("config", "check", config=path)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"# {path}: valid"
    data = tomllib.loads(out)
    assert data["smtp"]["max_message_size"] == "35MB"
    assert data["smtp"]["relay_networks"] == ["127.0.0.0/8", "::1/128"]
    assert data["queue"]["message_expiration"] == "48h"
    assert data["queue"]["retry_schedule"] == ["90s", "15m", "2h"]
    assert data["queue"]["retention"] == "14d"
    assert data["dns"]["timeout"] == "5s"
    assert data["connectors"][0]["connect_timeout"] == "30s"
    assert data["alerts"]["after"] == "1h"
    # Defaults of keys the file leaves out are printed too ("effective").
    assert data["smtp"]["tls_certificate"] == ""
    # What it prints is itself a valid config that means the same thing.
    reparsed = parse_config(out, source="(printed)", base_dir=path.parent).config
    assert reparsed == load_config(str(path)).config


def test_config_check_of_the_example(tmp_path: Path) -> None:
    code, out, _ = run_cli("config", "check", config=EXAMPLE_CONFIG, cwd=tmp_path)
    assert code == 0
    assert 'message_expiration = "48h"' in out
    assert 'retry_schedule = ["1m", "5m", "15m", "30m", "1h"]' in out
    assert 'retention = "7d"' in out
