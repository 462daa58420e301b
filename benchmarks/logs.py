"""Logging set-up shared by the benchmark commands' ``main``s.

Every command logs to stderr at WARNING, so the libraries' chatter stays out of the tables on
stdout. The commands that start services also show INFO from pdmesh and from themselves: the
progress lines (arm started, warm-up done, ...). Their loggers are named ``benchmarks.*``; under
``pdmesh.bench`` the ``pdmesh`` logger covered them, so both names are raised here.
"""

from __future__ import annotations

import logging

_FORMAT = "%(asctime)s %(levelname)s %(message)s"
# the loggers whose INFO lines are a benchmark's progress
_PROGRESS_LOGGERS = ("pdmesh", "benchmarks")


def setup_logging(progress: bool = True) -> None:
    """WARNING everywhere; INFO for pdmesh and the benchmarks too unless ``progress=False``."""
    logging.basicConfig(level=logging.WARNING, format=_FORMAT)
    if progress:
        for name in _PROGRESS_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
