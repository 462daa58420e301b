"""The model's building blocks that the engine and the models both use: paged attention (torch
and Triton), the CUDA ops and the batch-1 GEMV kernels. Neither ``pdmesh.engine`` nor
``pdmesh.models`` is imported here, so the two depend on this package, not on each other."""
