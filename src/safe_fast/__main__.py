"""``python -m safe_fast --version``: the version report (see ``_about``)."""

from __future__ import annotations

import sys

from ._about import version_report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--version"]:
        print(version_report())
        return 0
    sys.stderr.write("usage: python -m safe_fast --version\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
