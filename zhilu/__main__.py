"""``python -m zhilu``: the same as the ``zhilu`` command."""

import sys

from zhilu.cli import main

if __name__ == "__main__":
    sys.exit(main())
