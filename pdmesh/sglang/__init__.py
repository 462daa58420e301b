"""Stubs of SGLang's scheduler gRPC protocol (``sglang.grpc.scheduler``), generated from
``protos/pdmesh/sglang/*.proto`` by ``make protos`` (gitignored; only this file is committed).
pdmesh serves and calls it to interoperate with SGLang (``services/sglang_grpc``)."""
