"""Interop with SGLang over its scheduler gRPC protocol (``sglang.grpc.scheduler``,
``protos/pdmesh/sglang``): ``servicer`` serves it on pdmesh workers (for SGLang's gateway
``smg`` in gRPC mode), ``client`` lets pdmesh's router drive workers that speak it (kind
``sglang-grpc``: SGLang engines started with --grpc-mode, or pdmesh workers). ``convert`` and
``info`` map its messages onto pdmesh's."""
