"""``python -m vlad.cli``."""

import sys

from vlad.cli import main

sys.exit(main())
