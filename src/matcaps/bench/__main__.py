"""``python -m matcaps.bench [options]`` is the same as ``matcaps bench [options]``."""

import sys

from matcaps.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
