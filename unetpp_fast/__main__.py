"""`python -m unetpp_fast` runs the `unetpp-fast` command line (the same as the console script)."""

import sys

from unetpp_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
