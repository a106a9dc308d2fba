"""`python -m services.cli ...` runs the `facecast` command line (the same as the installed `facecast` script)."""

import sys

from services.cli.main import main

sys.exit(main())
