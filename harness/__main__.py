"""`python -m harness` runs the qcrash command line."""

import sys

from harness.cli import main

sys.exit(main())
