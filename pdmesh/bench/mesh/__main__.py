"""``python -m pdmesh.bench.mesh``: the same as ``python -m pdmesh.bench mesh``."""

import sys

from pdmesh.bench.mesh.main import main

sys.exit(main())
