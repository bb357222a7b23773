"""``python -m pcamlib``: the ``pcamlib`` command line (also what ``torchrun -m pcamlib`` runs)."""

import sys

from pcamlib.cli import main

sys.exit(main())
