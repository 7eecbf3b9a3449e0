"""``python -m mr``: the command line."""

import sys

from mr.cli import main

sys.exit(main())
