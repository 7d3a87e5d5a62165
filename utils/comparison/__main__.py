"""``python -m utils.comparison``: the comparison of the five methods (see :mod:`.tool`)."""
import sys

from .tool import main

sys.exit(main())
