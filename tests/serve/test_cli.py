"""The ``safe-fast`` command line: version, settings precedence, every bad setting's exit 2."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import safe_fast
from serve_helpers import DEADLINE, command_env, run_command


def test_version_names_the_package_and_the_core() -> None:
    for args in (["--version"],):
        result = run_command(args)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"safe-fast {safe_fast.__version__} (core: {safe_fast.core_backend()}")


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("safe-fast")
    if not script.exists():
        pytest.skip("not installed with its console script")
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=DEADLINE, env=command_env()
    )
    assert result.returncode == 0 and result.stdout.startswith("safe-fast ")


def _rows(output: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in output.splitlines():
        key, rest = line.split(None, 1)
        value, _, source = rest.rpartition("(")
        rows[key] = (value.strip(), source.rstrip(")"))
    return rows


def test_flags_beat_environment_beat_the_file(tmp_path: Path) -> None:
    config = tmp_path / "safe-fast.toml"
    config.write_text(
        'port = 1111\nheartbeat_interval = 5\nlog_format = "json"\n'
        'redis_url = "redis://:hunter2@127.0.0.1:6379/0"\n'
        'allowed_origins = ["https://app.example.com"]\n'
        '[[jwt_issuers]]\nissuer = "https://idp.example.com"\nhmac_secret_env = "IDP_SECRET"\n'
    )
    result = run_command(
        ["config", "safe_fast.examples.counter:app", "--config", str(config), "--port", "3333", "--no-metrics"],
        env={"SAFE_FAST_PORT": "2222", "SAFE_FAST_HEARTBEAT_INTERVAL": "7", "IDP_SECRET": "s" * 40},
    )
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    assert rows["port"] == ("3333", "--port")
    assert rows["heartbeat_interval"] == ("7", "env SAFE_FAST_HEARTBEAT_INTERVAL")
    assert rows["log_format"] == ("json", f"config {config}")
    assert rows["metrics"] == ("false", "--metrics")
    assert rows["path"] == ("/realtime", "default")
    assert rows["app"] == ("safe_fast.examples.counter:app", "argument")
    assert rows["allowed_origins"][0] == "https://app.example.com"
    # secrets masked: the Redis password and the HMAC secret never appear
    assert rows["redis_url"][0] == "redis://:***@127.0.0.1:6379/0"
    assert "hunter2" not in result.stdout and "s" * 40 not in result.stdout
    assert "hmac_secret_env=IDP_SECRET" in rows["jwt_issuers[0]"][0]


def test_the_app_may_come_from_the_environment() -> None:
    result = run_command(["config"], env={"SAFE_FAST_APP": "safe_fast.examples.counter:app"})
    assert result.returncode == 0, result.stderr
    assert _rows(result.stdout)["app"] == ("safe_fast.examples.counter:app", "env SAFE_FAST_APP")


def _pem_public_key(path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


COUNTER = "safe_fast.examples.counter:app"
DURABLE_COUNTER = "safe_fast.examples.cluster_node:app"


def bad_settings(tmp_path: Path) -> list[tuple[str, list[str], dict[str, str], str]]:
    """(what, args, env, the start of the one error line)."""

    def toml(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    issuers = lambda entry: {"SAFE_FAST_JWT_ISSUERS": json.dumps([entry])}  # noqa: E731
    return [
        ("port not a number", [COUNTER, "--port", "abc"], {}, "port (--port): must be an integer"),
        ("backlog of 0", [COUNTER, "--backlog", "0"], {}, "backlog (--backlog): must be at least 1"),
        ("port past 65535", [COUNTER, "--port", "70000"], {}, "port (--port): must be at most 65535"),
        ("backlog past 2**31-1", [COUNTER, "--backlog", str(2**40)], {}, "backlog (--backlog): must be at most"),
        ("host that does not resolve", [COUNTER, "--host", "no-such-host.invalid"], {}, "host: cannot resolve"),
        (
            "store in a directory that does not exist",
            [DURABLE_COUNTER, "--store-url", f"sqlite:///{tmp_path / 'missing' / 'store.db'}"],
            {},
            "store_url (--store-url): ",
        ),
        (
            "store database that does not exist",
            [DURABLE_COUNTER, "--store-url", "postgresql://postgres@127.0.0.1:5432/safe_fast_no_such_database"],
            {},
            "store_url (--store-url): ",
        ),
        (
            "inspector on the WebSocket path",
            [COUNTER, "--inspector", "--path", "/"],
            {},
            "path (--path): / is the inspector",
        ),
        (
            "negative heartbeat",
            [COUNTER],
            {"SAFE_FAST_HEARTBEAT_INTERVAL": "-1"},
            "heartbeat_interval (env SAFE_FAST_HEARTBEAT_INTERVAL): must be at least 0",
        ),
        (
            "file value of the wrong type",
            [COUNTER, "--config", toml("a.toml", 'max_buffered_bytes = "lots"\n')],
            {},
            "max_buffered_bytes (config ",
        ),
        ("unknown key in the file", [COUNTER, "--config", toml("b.toml", "prot = 8000\n")], {}, "prot (config "),
        ("file not TOML", [COUNTER, "--config", toml("c.toml", "port = \n")], {}, "config: "),
        ("file missing", [COUNTER, "--config", str(tmp_path / "missing.toml")], {}, "config: cannot read"),
        (
            "store URL naming no file",
            [COUNTER, "--store-url", "sqlite:///"],
            {},
            "store_url (--store-url): sqlite store url 'sqlite:///' names no file",
        ),
        ("unknown store", [COUNTER, "--store-url", "mongodb://x"], {}, "store_url (--store-url): unknown store scheme"),
        (
            "redis URL of another scheme",
            [COUNTER, "--redis-url", "http://127.0.0.1:6379"],
            {},
            "redis_url (--redis-url): must be a redis://",
        ),
        (
            "workers without redis",
            [COUNTER, "--workers", "2"],
            {},
            "workers (--workers): 2 worker processes need a shared fan-out",
        ),
        ("log level", [COUNTER, "--log-level", "loud"], {}, "log_level (--log-level): must be one of"),
        ("log format", [COUNTER], {"SAFE_FAST_LOG_FORMAT": "xml"}, "log_format (env SAFE_FAST_LOG_FORMAT)"),
        ("origin", [COUNTER, "--allowed-origins", "app.example.com"], {}, "allowed_origins (--allowed-origins)"),
        ("proxy network", [COUNTER, "--trusted-proxies", "10.0.0.0/33"], {}, "trusted_proxies (--trusted-proxies)"),
        (
            "boolean",
            [COUNTER],
            {"SAFE_FAST_METRICS": "maybe"},
            "metrics (env SAFE_FAST_METRICS): must be true or false",
        ),
        (
            "delay past the timeout",
            [COUNTER, "--shutdown-delay", "10"],
            {},
            "shutdown_delay (--shutdown-delay): must be shorter than shutdown_timeout",
        ),
        (
            "certificate without key",
            [COUNTER, "--ssl-certfile", toml("cert.pem", "x")],
            {},
            "ssl_keyfile (--ssl-certfile): needed with ssl_certfile",
        ),
        (
            "certificate missing",
            [COUNTER, "--ssl-certfile", str(tmp_path / "no.pem"), "--ssl-keyfile", toml("key.pem", "x")],
            {},
            "ssl_certfile (--ssl-certfile): cannot read",
        ),
        (
            "certificate not PEM",
            [COUNTER, "--ssl-certfile", toml("bad-cert.pem", "x"), "--ssl-keyfile", toml("bad-key.pem", "x")],
            {},
            "ssl_certfile (--ssl-certfile): cannot load the certificate and key",
        ),
        ("no app", [], {}, "app: missing"),
        ("app not module:attribute", ["safe_fast.examples.counter"], {}, "app (argument): must be 'module:attribute'"),
        ("app module missing", ["no_such_module_here:app"], {}, "app: cannot import module 'no_such_module_here'"),
        ("app attribute missing", ["serve_apps:nothing"], {}, "app: module 'serve_apps' has no attribute 'nothing'"),
        ("app not callable", ["serve_apps:not_callable"], {}, "app: serve_apps:not_callable is not callable"),
        (
            "app raises",
            ["serve_apps:raises"],
            {},
            "app: serve_apps:raises raised RuntimeError: the application failed to start",
        ),
        ("nothing authenticates", ["serve_apps:no_hooks"], {}, "jwt_issuers: nothing authenticates connections"),
        (
            "authenticate twice",
            [COUNTER],
            issuers({"issuer": "i", "hmac_secret_env": "S"}) | {"S": "s" * 32},
            "jwt_issuers (env SAFE_FAST_JWT_ISSUERS): the app returns its own authenticate",
        ),
        (
            "issuers not JSON",
            ["serve_apps:no_hooks"],
            {"SAFE_FAST_JWT_ISSUERS": "[{"},
            "jwt_issuers (env SAFE_FAST_JWT_ISSUERS): must be a JSON list",
        ),
        (
            "issuer without a key",
            ["serve_apps:no_hooks"],
            issuers({"issuer": "i"}),
            "jwt_issuers[0] (env SAFE_FAST_JWT_ISSUERS): needs exactly one of",
        ),
        (
            "key file missing",
            ["serve_apps:no_hooks"],
            issuers({"issuer": "i", "public_key_file": str(tmp_path / "nope.pem")}),
            "jwt_issuers[0].public_key_file: cannot read",
        ),
        (
            "key file not a key",
            ["serve_apps:no_hooks"],
            issuers({"issuer": "i", "public_key_file": toml("k.pem", "hello")}),
            "jwt_issuers[0].public_key_file: not a PEM public key",
        ),
        (
            "key of the wrong algorithm",
            ["serve_apps:no_hooks"],
            issuers(
                {"issuer": "i", "public_key_file": str(_pem_public_key(tmp_path / "ec.pem")), "algorithms": ["RS256"]}
            ),
            "jwt_issuers[0].public_key_file: an EC key can only verify",
        ),
        (
            "secret variable unset",
            ["serve_apps:no_hooks"],
            issuers({"issuer": "i", "hmac_secret_env": "UNSET_SECRET_VAR"}),
            "jwt_issuers[0].hmac_secret_env: environment variable UNSET_SECRET_VAR is not set",
        ),
        (
            "secret too short",
            ["serve_apps:no_hooks"],
            issuers({"issuer": "i", "hmac_secret_env": "S"}) | {"S": "short"},
            "jwt_issuers[0].hmac_secret_env: HS256 needs a secret of at least 32 bytes",
        ),
        (
            "JWKS URL not http",
            ["serve_apps:no_hooks"],
            issuers({"issuer": "i", "jwks_url": "file:///etc/passwd"}),
            "jwt_issuers[0].jwks_url (env SAFE_FAST_JWT_ISSUERS): must be an http://",
        ),
    ]


def _serve_command(args: list[str]) -> list[str]:
    # Port 0 where a case would otherwise start: a setting that wrongly passed shows as "still running".
    extra = ["--port", "0"] if args and "--port" not in args else []
    return [sys.executable, "-m", "safe_fast", "serve", *args, *extra]


def test_every_bad_setting_exits_2_with_one_line_naming_it(tmp_path: Path) -> None:
    cases = bad_settings(tmp_path)
    failures = []
    # A few at a time, side by side: each is a Python start-up.
    for start in range(0, len(cases), 6):
        procs = [
            (
                what,
                expected,
                subprocess.Popen(
                    _serve_command(args),
                    env=command_env(env),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
            for what, args, env, expected in cases[start : start + 6]
        ]
        for what, expected, proc in procs:
            try:
                _, err = proc.communicate(timeout=DEADLINE * 2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                failures.append(f"{what}: still running (it started?)")
                continue
            lines = err.strip().splitlines()
            if proc.returncode != 2 or len(lines) != 1 or not lines[0].startswith(f"safe-fast: error: {expected}"):
                failures.append(f"{what}: exit {proc.returncode}, stderr {err!r}")
    assert not failures, "\n".join(failures)


def test_a_port_in_use_exits_2_naming_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_command(["serve", COUNTER, "--port", str(port)])
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith(f"safe-fast: error: port: cannot listen on 127.0.0.1:{port}")
    )


def test_no_command_is_a_usage_error() -> None:
    result = run_command([])
    assert result.returncode == 2 and "give a command" in result.stderr


def test_workers_that_cannot_listen_stop_the_supervisor_with_exit_2() -> None:
    with socket.socket() as taken:  # bound without SO_REUSEPORT: no worker can share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_command(
            ["serve", COUNTER, "--port", str(port), "--workers", "2", "--redis-url", "redis://127.0.0.1:1/0"]
        )
    assert result.returncode == 2, result.stderr
    assert f"safe-fast: error: port: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "found a bad setting; stopping" in result.stderr


def test_config_checks_key_files_and_secrets_without_starting(tmp_path: Path) -> None:
    issuers = json.dumps([{"issuer": "i", "hmac_secret_env": "UNSET_SECRET_VAR"}])
    result = run_command(["config", "serve_apps:raises"], env={"SAFE_FAST_JWT_ISSUERS": issuers})
    # the app is imported, not called (it would raise); the secret's variable is checked
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "safe-fast: error: jwt_issuers[0].hmac_secret_env: environment variable UNSET_SECRET_VAR is not set"
    )
