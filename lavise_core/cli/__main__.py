"""``python -m lavise_core.cli``: the ``lavise`` command."""

import sys

from lavise_core.cli import main

sys.exit(main())
