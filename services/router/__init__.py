"""The router service (``python -m services.router``): ``pdmesh.v1.RouterService``, the mesh's
gRPC front door — tokenize (via the tokenizer service), pick a worker (``pdmesh.routing``),
stream its tokens back as text deltas with stop strings applied, and manage the worker set."""
