"""``python -m cocochallenge ...``: see :mod:`cocochallenge.cli`."""

import sys

from .cli import main

sys.exit(main())
