"""``python -m teskd``: the same command line as the ``teskd`` script."""

import sys

from teskd.cli import main

if __name__ == "__main__":
    sys.exit(main())
