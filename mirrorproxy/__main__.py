"""`python -m mirrorproxy` runs the command line."""

import sys

from mirrorproxy.cli import main

sys.exit(main())
