"""The ``safe-fast`` command: ``serve`` an application, show its effective ``config``.

    safe-fast serve safe_fast.examples.counter:app --port 8000
    safe-fast config myapp:app --config safe-fast.toml
    safe-fast --version

Every option of :data:`safe_fast.config.OPTIONS` is a flag here, an
environment variable ``SAFE_FAST_<NAME>`` and a key of the TOML file given by
``--config``, in that order of precedence. A bad setting prints one line
naming it and exits with status 2, before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from typing import Any, Optional, Sequence

import orjson

from .config import OPTIONS, ConfigError, Settings, load_settings, unknown_variables

__all__ = ["main", "build_parser", "setup_logging"]

PROG = "safe-fast"
EXIT_USAGE = 2

WORKER_ENV = "SAFE_FAST_WORKER_OF"
"""Set by the supervisor in its workers' environment: the supervisor's pid."""


def _version_text() -> str:
    from ._about import version_report

    return version_report()


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (values are checked by load_settings, which names the key)."""
    group = parser.add_argument_group("settings (flag > SAFE_FAST_<NAME> > --config file > default)")
    for option in OPTIONS:
        if option.boolean:
            group.add_argument(
                option.cli,
                dest=option.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{option.help} (default: {'on' if option.default else 'off'})",
            )
        else:
            default = "none" if option.default in (None, ()) else option.default
            group.add_argument(
                option.cli,
                dest=option.name,
                metavar=option.metavar or "VALUE",
                default=None,
                help=f"{option.help} (default: {default})",
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Run a safe_fast realtime server.")
    parser.add_argument("--version", action="store_true", help="print the version and the core in use, then exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in (
        ("serve", "run the server for APP until SIGTERM/SIGINT"),
        ("config", "print the effective settings for APP and where each comes from (secrets masked)"),
    ):
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.add_argument(
            "app",
            nargs="?",
            metavar="APP",
            help="module:attribute of the application (e.g. safe_fast.examples.counter:app)",
        )
        sub.add_argument("--config", metavar="FILE", help="TOML settings file (also SAFE_FAST_CONFIG)")
        add_option_arguments(sub)
    return parser


# -- logging -------------------------------------------------------------------------


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLinesFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # picows logs every failed handshake at INFO; that is debug detail for an operator.
    logging.getLogger("picows").setLevel(max(logging.WARNING, root.level))


# -- commands ------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    flags = {option.name: getattr(args, option.name, None) for option in OPTIONS}
    return load_settings(args.app, flags, config_file=args.config)


def _print_config(settings: Settings) -> None:
    rows = settings.describe()
    width = max(len(key) for key, _, _ in rows)
    value_width = min(48, max(len(value) for _, value, _ in rows))
    for key, value, source in rows:
        print(f"{key:<{width}}  {value:<{value_width}}  ({source})")


def _serve(settings: Settings, argv: Sequence[str]) -> int:
    from .server import use_uvloop

    setup_logging(settings.log_level, settings.log_format)
    for name in unknown_variables():
        logging.getLogger("safe_fast.serve").warning("ignoring %s: no setting has that name", name)
    worker_of = os.environ.get(WORKER_ENV)
    if settings.workers > 1 and not worker_of:
        from .supervisor import supervise

        return supervise(settings, list(argv))
    from .runner import serve

    use_uvloop()
    parent = int(worker_of) if worker_of else None
    return asyncio.run(serve(settings, reuse_port=parent is not None, watch_parent=parent))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``safe-fast`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(_version_text())
        return 0
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: give a command: serve or config", file=sys.stderr)
        return EXIT_USAGE
    try:
        settings = _settings(args)
        if args.command == "config":
            from .runner import check_without_starting

            check_without_starting(settings)
            _print_config(settings)
            return 0
        return _serve(settings, argv)
    except ConfigError as exc:
        print(f"{PROG}: {'error' if exc.status == EXIT_USAGE else 'unavailable'}: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
