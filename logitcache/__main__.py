"""``python -m logitcache``: the ``logitcache`` command without its console script."""

import sys

from logitcache.cli import main

sys.exit(main())
