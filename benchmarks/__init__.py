"""Offline engine benchmark: pdmesh's ``LLMEngine`` against transformers ``generate``.

Run ``python -m benchmarks --help``. Both sides run the same weights in the same process, with
their runs interleaved, so other load on the machine moves the ratios less than the absolute
numbers (the table still shows the load average: on a busy machine rerun); nothing here asserts
a time. ``config`` holds the flags, ``workload`` the prompts and timing definitions, ``offline``
the pdmesh side, ``reference`` the transformers side, ``report`` the table and JSON, and
``profile`` the per-phase breakdown of a pdmesh decode step (``--profile-steps``).
``benchmarks.serve`` (its own subpackage) benchmarks the running services instead.
"""
