"""``python -m simulators simulate|record|replay …``: the simulator commands alone."""

import sys

from simulators.cli import main

sys.exit(main())
