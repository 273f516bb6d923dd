"""``python -m matcaps`` is the same as the ``matcaps`` command."""

import sys

from matcaps.cli import main

sys.exit(main())
