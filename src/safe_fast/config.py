"""Settings of ``safe-fast serve``: one table of options, three sources.

Theory of operation
-------------------

Every setting is one :class:`Option` in :data:`OPTIONS`: its name (which is
also its TOML key), its type, its default and its help text. From that one
line come the command-line flag (``--max-buffered-bytes``), the environment
variable (``SAFE_FAST_MAX_BUFFERED_BYTES``) and the TOML key
(``max_buffered_bytes``), so adding a setting is adding a line.

:func:`load_settings` merges, lowest first: the defaults, the TOML file
(``--config`` or ``SAFE_FAST_CONFIG``), the environment, the flags. Each
value is parsed and checked where it comes from, so the error names both
the key and the place (``port (env SAFE_FAST_PORT): ...``). Checks that
involve several settings (``workers`` needs ``redis_url``) run last. The
result, :class:`Settings`, remembers where each value came from, for
``safe-fast config``; secrets are masked when shown.

A bad setting raises :class:`ConfigError`; the command line turns it into
one line on stderr and exit status 2, before anything is started.
"""

from __future__ import annotations

import ipaddress
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional
from urllib.parse import urlsplit, urlunsplit

from .server.connection import DEFAULT_REPLAY_TIMEOUT

__all__ = [
    "ConfigError",
    "TemporarilyUnavailable",
    "IssuerSettings",
    "Option",
    "OPTIONS",
    "Settings",
    "ENV_PREFIX",
    "load_settings",
    "mask_url",
    "unknown_variables",
]

ENV_PREFIX = "SAFE_FAST_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"

STORE_SCHEMES = ("memory", "sqlite", "postgresql", "postgres")
"""Store URL schemes this build can open (see docs/store.md)."""


class ConfigError(ValueError):
    """One bad setting: ``key`` names it, ``source`` where it came from (exit status :attr:`status`)."""

    status = 2
    """Restarting would not fix it."""

    def __init__(self, key: str, why: str, source: str = "") -> None:
        self.key = key
        self.why = why
        self.source = source
        where = f" ({source})" if source else ""
        super().__init__(f"{key}{where}: {why}")


class TemporarilyUnavailable(ConfigError):
    """Something the setting names cannot be reached now (a store, the app's own connections).

    Exit status 75 (``EX_TEMPFAIL``): starting again later may work, so a
    supervisor or systemd restarts it.
    """

    status = 75


# -- value types ---------------------------------------------------------------------
#
# A kind turns a value from any source into the setting's value, or raises
# ValueError saying why. Values from the environment and flags are strings;
# values from TOML keep their TOML type (and a string is accepted too).


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _integer(minimum: int, maximum: Optional[int] = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"must be an integer, got {_show(value)}")
        if isinstance(value, str):
            try:
                value = int(value.strip(), 10)
            except ValueError:
                raise ValueError(f"must be an integer, got {_show(value)}") from None
        if not isinstance(value, int):
            raise ValueError(f"must be an integer, got {_show(value)}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be at most {maximum}, got {value}")
        return value

    return parse


def _number(minimum: float, *, above: bool = False) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {_show(value)}")
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"must be a number, got {_show(value)}") from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {_show(value)}")
        if value < minimum or (above and value == minimum):
            raise ValueError(f"must be {'greater than' if above else 'at least'} {minimum:g}, got {value:g}")
        return float(value)

    return parse


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise ValueError(f"must be true or false, got {_show(value)}")


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _text(value).strip().lower()
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {_show(value)}")
        return text

    return parse


def _string_list(value: Any) -> tuple[str, ...]:
    """A TOML array of strings, or a comma-separated string."""
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
        return tuple(item for item in items if item)
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return tuple(item.strip() for item in value if item.strip())
    raise ValueError(f"must be a list of strings (or a comma-separated string), got {_show(value)}")


def _app(value: Any) -> str:
    text = _text(value).strip()
    module, _, attribute = text.partition(":")
    if not module or not attribute:
        raise ValueError(f"must be 'module:attribute' (as in safe_fast.examples.counter:app), got {_show(value)}")
    return text


def _host(value: Any) -> str:
    text = _text(value).strip()
    if not text:
        raise ValueError("must not be empty (0.0.0.0 listens on every IPv4 address)")
    return text


def _nonempty(value: Any) -> str:
    text = _text(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _path(value: Any) -> str:
    text = _text(value)
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', got {_show(value)}")
    if text in ("/healthz", "/readyz", "/metrics"):
        raise ValueError(f"{text} is the server's own health or metrics path")
    return text


def _store_url(value: Any) -> str:
    text = _text(value).strip()
    scheme = urlsplit(text).scheme.lower()
    if scheme not in STORE_SCHEMES:
        raise ValueError(
            f"unknown store scheme {scheme + '://' if scheme else _show(text)};"
            " use memory://, sqlite:///path.db or postgresql://user@host:port/db"
        )
    from .store import open_store

    open_store(text)  # checks the rest of the URL (a SQLite URL names a file)
    return text


def _redis_url(value: Any) -> Optional[str]:
    text = _text(value).strip()
    if not text:
        return None
    scheme = urlsplit(text).scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"must be a redis://, rediss:// or unix:// URL, got scheme {scheme or 'none'!r}")
    return text


def _networks(value: Any) -> tuple[str, ...]:
    items = _string_list(value)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network (CIDR)") from None
    return items


def _origins(value: Any) -> tuple[str, ...]:
    items = _string_list(value)
    for item in items:
        if item == "*":
            continue
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise ValueError(f"{item!r} is not an origin such as https://app.example.com (or '*')")
    return items


@dataclass(frozen=True)
class Option:
    """One setting: its TOML key, how to parse it, its default and its help."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str = ""
    secret: bool = False
    boolean: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")


# The option table. Grouped as the help output shows them; a new setting is a
# new line here (and, if the server takes it, one more entry in
# runner.server_options).
OPTIONS: tuple[Option, ...] = (
    # where to listen
    Option("host", _host, "127.0.0.1", "address to listen on", "ADDR"),
    Option("port", _integer(0, 65535), 8000, "TCP port (0: any free port)", "PORT"),
    Option("path", _path, "/realtime", "WebSocket path", "PATH"),
    Option("backlog", _integer(1, 2**31 - 1), None, "listen backlog (default: the system's somaxconn)", "N"),
    Option("ssl_certfile", _nonempty, None, "PEM certificate chain: serve wss:// (and https health) itself", "FILE"),
    Option("ssl_keyfile", _nonempty, None, "PEM private key of ssl_certfile", "FILE"),
    # shared state
    Option("store_url", _store_url, "memory://", "where ShareData lives (memory://, sqlite:///path.db, postgresql://user@host:port/db)", "URL", secret=True),
    Option(
        "redis_url", _redis_url, None, "Redis for fan-out and replay across processes and nodes", "URL", secret=True
    ),
    # the server's options (attach_realtime_server)
    Option("replay_buffer_size", _integer(1), 100, "transactions kept per ShareData for resuming clients", "N"),
    Option(
        "max_buffered_bytes", _integer(1), 1024 * 1024, "unsent bytes a client may fall behind before 4001", "BYTES"
    ),
    Option("heartbeat_interval", _number(0), 30.0, "seconds between pings (0: no heartbeat)", "SECONDS"),
    Option("max_message_size", _integer(1), 8 * 1024 * 1024, "largest client message (bigger closes 1009)", "BYTES"),
    Option(
        "close_on_token_expiry", _boolean, True, "close a connection with 4002 when its token expires", boolean=True
    ),
    Option("close_timeout", _number(0, above=True), 5.0, "seconds a closing client may take to answer", "SECONDS"),
    Option(
        "replay_timeout",
        _number(0, above=True),
        DEFAULT_REPLAY_TIMEOUT,
        "seconds a resuming subscribe waits for the replay store",
        "SECONDS",
    ),
    Option("inspector", _boolean, False, "serve the browser inspector page at /", boolean=True),
    # admission
    Option("allowed_origins", _origins, (), "Origins allowed to connect (comma list; empty: any)", "ORIGINS"),
    Option("message_rate_limit", _number(0), 200.0, "messages per second per connection (0: no limit)", "PER_SECOND"),
    Option("message_burst", _integer(1), 2000, "messages a connection may send at once above the rate", "N"),
    Option("max_connections_per_address", _integer(0), 0, "concurrent connections per client address (0: no cap)", "N"),
    Option("trusted_proxies", _networks, (), "proxies whose X-Forwarded-For is believed (comma list of CIDRs)", "NETS"),
    # JWT authentication (issuers come from the TOML file or SAFE_FAST_JWT_ISSUERS)
    Option("jwt_audience", _nonempty, "sharedata", "the aud claim tokens must carry", "AUDIENCE"),
    Option("jwt_leeway", _number(0), 0.0, "seconds of clock skew allowed on exp/nbf/iat", "SECONDS"),
    Option("jwt_require_exp", _boolean, True, "refuse tokens without exp", boolean=True),
    # the process
    Option("workers", _integer(1), 1, "server processes sharing the port (SO_REUSEPORT; >1 needs redis_url)", "N"),
    Option("shutdown_timeout", _number(0, above=True), 10.0, "seconds a graceful shutdown may take", "SECONDS"),
    Option("shutdown_delay", _number(0), 0.0, "seconds /readyz answers 503 before the listener closes", "SECONDS"),
    Option("metrics", _boolean, True, "serve Prometheus metrics at /metrics", boolean=True),
    Option("log_level", _choice("debug", "info", "warning", "error", "critical"), "info", "log level", "LEVEL"),
    Option("log_format", _choice("text", "json"), "text", "text lines or JSON lines", "FORMAT"),
)
OPTIONS_BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}


# -- JWT issuers -------------------------------------------------------------------


@dataclass(frozen=True)
class IssuerSettings:
    """One trusted token issuer: exactly one of a PEM file, an HMAC secret (named env var) or a JWKS URL."""

    issuer: str
    public_key_file: Optional[str] = None
    hmac_secret_env: Optional[str] = None
    jwks_url: Optional[str] = None
    algorithms: tuple[str, ...] = ()
    kid: Optional[str] = None
    jwks_min_refresh_interval: float = 1.0
    jwks_refresh_interval: float = 300.0

    def describe(self) -> str:
        """How it is shown by ``safe-fast config`` (the secret's variable name, never the secret)."""
        if self.public_key_file is not None:
            key = f"public_key_file={self.public_key_file}"
        elif self.hmac_secret_env is not None:
            key = f"hmac_secret_env={self.hmac_secret_env}"
        else:
            key = f"jwks_url={mask_url(self.jwks_url or '')}"
        extra = f" algorithms={','.join(self.algorithms)}" if self.algorithms else ""
        extra += f" kid={self.kid}" if self.kid else ""
        return f"{self.issuer} {key}{extra}"


_ISSUER_KEYS = {
    "issuer",
    "public_key_file",
    "hmac_secret_env",
    "jwks_url",
    "algorithms",
    "kid",
    "jwks_min_refresh_interval",
    "jwks_refresh_interval",
}


def _issuer(index: int, table: Any) -> IssuerSettings:
    key = f"jwt_issuers[{index}]"
    if not isinstance(table, Mapping):
        raise ConfigError(key, f"must be a table, got {_show(table)}")
    unknown = sorted(set(table) - _ISSUER_KEYS)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_ISSUER_KEYS))})")
    try:
        issuer = _text(table.get("issuer"))
        if not issuer:
            raise ValueError("must not be empty")
    except ValueError as exc:
        raise ConfigError(f"{key}.issuer", str(exc)) from None
    values: dict[str, Any] = {"issuer": issuer}
    for name in ("public_key_file", "hmac_secret_env", "jwks_url", "kid"):
        if name in table:
            try:
                values[name] = _text(table[name])
            except ValueError as exc:
                raise ConfigError(f"{key}.{name}", str(exc)) from None
    if "algorithms" in table:
        try:
            values["algorithms"] = _string_list(table["algorithms"])
        except ValueError as exc:
            raise ConfigError(f"{key}.algorithms", str(exc)) from None
    for name in ("jwks_min_refresh_interval", "jwks_refresh_interval"):
        if name in table:
            try:
                values[name] = _number(0, above=name == "jwks_refresh_interval")(table[name])
            except ValueError as exc:
                raise ConfigError(f"{key}.{name}", str(exc)) from None
    sources = [name for name in ("public_key_file", "hmac_secret_env", "jwks_url") if name in values]
    if len(sources) != 1:
        raise ConfigError(key, "needs exactly one of public_key_file, hmac_secret_env, jwks_url")
    if "jwks_url" in values and urlsplit(values["jwks_url"]).scheme not in ("http", "https"):
        raise ConfigError(f"{key}.jwks_url", "must be an http:// or https:// URL")
    return IssuerSettings(**values)


def _parse_issuers(value: Any) -> tuple[IssuerSettings, ...]:
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConfigError("jwt_issuers", f"must be a JSON list of issuer tables: {exc}") from None
    if not isinstance(value, (list, tuple)):
        raise ConfigError("jwt_issuers", f"must be a list of issuer tables, got {_show(value)}")
    return tuple(_issuer(index, table) for index, table in enumerate(value))


# -- the result ----------------------------------------------------------------------


@dataclass
class Settings:
    """The effective settings, with where each came from."""

    app: str
    values: dict[str, Any]
    sources: dict[str, str]
    jwt_issuers: tuple[IssuerSettings, ...] = ()
    issuers_source: str = "default"
    config_file: Optional[str] = None

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values")
        if values is not None and name in values:
            return values[name]
        raise AttributeError(name)

    def describe(self) -> list[tuple[str, str, str]]:
        """(key, shown value, source) for every setting, secrets masked."""
        rows = [("app", self.app, self.sources.get("app", "argument"))]
        for option in OPTIONS:
            value = self.values[option.name]
            rows.append((option.name, _display(option, value), self.sources[option.name]))
        if self.jwt_issuers:
            for index, issuer in enumerate(self.jwt_issuers):
                rows.append((f"jwt_issuers[{index}]", issuer.describe(), self.issuers_source))
        else:
            rows.append(("jwt_issuers", "(none)", self.issuers_source))
        return rows


def mask_url(url: str) -> str:
    """``url`` with its password (or a lone user token) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.password is None and not parts.username:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username if parts.password is not None else ""
    credentials = f"{user}:***" if parts.password is not None else "***"
    return urlunsplit((parts.scheme, f"{credentials}@{host}", parts.path, parts.query, parts.fragment))


def _display(option: Option, value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value) if value else "(none)"
    if option.secret and isinstance(value, str):
        return mask_url(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# -- loading -------------------------------------------------------------------------


def _read_toml(path: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None


def load_settings(
    app: Optional[str],
    flags: Mapping[str, Any],
    environ: Optional[Mapping[str, str]] = None,
    config_file: Optional[str] = None,
) -> Settings:
    """Merge defaults < TOML file < environment < flags; raise ConfigError for the first bad setting.

    ``flags`` maps option names to values given on the command line (absent
    or None: not given). ``app`` may also come from the TOML key ``app`` or
    ``SAFE_FAST_APP``.
    """
    env = os.environ if environ is None else environ
    if config_file is None and env.get(CONFIG_ENV):
        config_file = env[CONFIG_ENV]
    table = _read_toml(config_file) if config_file else {}
    toml_source = f"config {config_file}"
    known = set(OPTIONS_BY_NAME) | {"app", "jwt_issuers"}
    for key in table:
        if key not in known:
            raise ConfigError(key, "unknown setting", toml_source)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        candidates: list[tuple[str, Any]] = [("default", option.default)]
        if option.name in table:
            candidates.append((toml_source, table[option.name]))
        if option.env in env:
            candidates.append((f"env {option.env}", env[option.env]))
        if flags.get(option.name) is not None:
            candidates.append((option.cli, flags[option.name]))
        source, raw = candidates[-1]
        if source == "default":
            value = raw
        else:
            try:
                value = option.parse(raw)
            except ValueError as exc:
                raise ConfigError(option.name, str(exc), source) from None
        values[option.name] = value
        sources[option.name] = source

    app_sources: list[tuple[str, Any]] = []
    if "app" in table:
        app_sources.append((toml_source, table["app"]))
    if env.get(ENV_PREFIX + "APP"):
        app_sources.append((f"env {ENV_PREFIX}APP", env[ENV_PREFIX + "APP"]))
    if app:
        app_sources.append(("argument", app))
    if not app_sources:
        raise ConfigError("app", "missing: give APP as module:attribute (e.g. safe_fast.examples.counter:app)")
    app_source, app_raw = app_sources[-1]
    try:
        app_value = _app(app_raw)
    except ValueError as exc:
        raise ConfigError("app", str(exc), app_source) from None
    sources["app"] = app_source

    issuers: tuple[IssuerSettings, ...] = ()
    issuers_source = "default"
    raw_issuers: Any = None
    if "jwt_issuers" in table:
        raw_issuers, issuers_source = table["jwt_issuers"], toml_source
    if env.get(ENV_PREFIX + "JWT_ISSUERS"):
        raw_issuers, issuers_source = env[ENV_PREFIX + "JWT_ISSUERS"], f"env {ENV_PREFIX}JWT_ISSUERS"
    if raw_issuers is not None:
        try:
            issuers = _parse_issuers(raw_issuers)
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.why, issuers_source) from None

    settings = Settings(
        app=app_value,
        values=values,
        sources=sources,
        jwt_issuers=issuers,
        issuers_source=issuers_source,
        config_file=config_file,
    )
    _check_together(settings)
    return settings


_OTHER_VARIABLES = frozenset(
    ENV_PREFIX + name for name in ("APP", "CONFIG", "JWT_ISSUERS", "PURE_PYTHON", "REQUIRE_COMPILED", "WORKER_OF")
)


def unknown_variables(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """``SAFE_FAST_*`` variables that name no setting (a typo is otherwise silently ignored)."""
    env = os.environ if environ is None else environ
    known = _OTHER_VARIABLES | {option.env for option in OPTIONS}
    return sorted(name for name in env if name.startswith(ENV_PREFIX) and name not in known)


def _check_together(settings: Settings) -> None:
    """Checks that involve more than one setting, or the platform."""
    if settings.values["inspector"] and settings.values["path"] == "/":
        raise ConfigError("path", "/ is the inspector page's path (with inspector on)", settings.sources["path"])
    if bool(settings.values["ssl_certfile"]) != bool(settings.values["ssl_keyfile"]):
        given, missing = (
            ("ssl_certfile", "ssl_keyfile") if settings.values["ssl_certfile"] else ("ssl_keyfile", "ssl_certfile")
        )
        raise ConfigError(missing, f"needed with {given}", settings.sources[given])
    if settings.values["shutdown_delay"] >= settings.values["shutdown_timeout"]:
        raise ConfigError(
            "shutdown_delay",
            f"must be shorter than shutdown_timeout ({settings.values['shutdown_timeout']:g}s)",
            settings.sources["shutdown_delay"],
        )
    workers = settings.values["workers"]
    if workers > 1:
        if not settings.values["redis_url"]:
            raise ConfigError(
                "workers",
                f"{workers} worker processes need a shared fan-out: set redis_url"
                " (without it a broadcast reaches only the subscribers of one worker)",
                settings.sources["workers"],
            )
        import socket

        if not hasattr(socket, "SO_REUSEPORT"):
            raise ConfigError(
                "workers", "this platform has no SO_REUSEPORT; run one process per port", settings.sources["workers"]
            )
        if settings.values["port"] == 0:
            raise ConfigError("port", "several workers need a fixed port, not 0", settings.sources["port"])
