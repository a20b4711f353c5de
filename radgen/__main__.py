"""``python -m radgen``: the same as the ``radgen`` command."""

import sys

from radgen.cli import main

sys.exit(main())
