"""``python -m agentauth.archive export|verify``: the archiver as a (Ray) job."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
