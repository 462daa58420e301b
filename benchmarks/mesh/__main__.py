"""``python -m benchmarks.mesh``: the same as ``python -m benchmarks mesh``."""

import sys

from benchmarks.mesh.main import main

sys.exit(main())
