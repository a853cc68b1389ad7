"""``python -m safe_fast``: the ``safe-fast`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
