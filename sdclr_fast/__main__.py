"""``python -m sdclr_fast``: the same command line as the ``sdclr-fast`` script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
