"""``ReceiverHandle`` ↔ ``pdmesh.v1.KVReceiverHandle`` (kv_transfer.proto): the worker service's
edge, where a decode's transfer handles go on the wire at registration."""

from __future__ import annotations

from pdmesh.engine.kv_cache import KVLayout
from pdmesh.kv_transfer.handle import ReceiverHandle
from pdmesh.v1 import kv_transfer_pb2


def handle_to_pb(handle: ReceiverHandle) -> kv_transfer_pb2.KVReceiverHandle:
    layout = handle.layout
    return kv_transfer_pb2.KVReceiverHandle(
        backend=handle.backend,
        address=handle.address,
        receiver_id=handle.receiver_id,
        base_ptr=layout.base_ptr,
        total_bytes=layout.total_bytes,
        num_layers=layout.num_layers,
        num_pages=layout.num_pages,
        page_size=layout.page_size,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        dtype=layout.dtype,
        device=layout.device,
        order=layout.order,
        backend_data=handle.extra,
        transport=handle.transport,
    )


def handle_from_pb(pb: kv_transfer_pb2.KVReceiverHandle) -> ReceiverHandle:
    layout = KVLayout(
        base_ptr=pb.base_ptr,
        total_bytes=pb.total_bytes,
        num_layers=pb.num_layers,
        num_pages=pb.num_pages,
        page_size=pb.page_size,
        num_kv_heads=pb.num_kv_heads,
        head_dim=pb.head_dim,
        dtype=pb.dtype,
        device=pb.device,
        order=pb.order,
    )
    return ReceiverHandle(
        pb.backend, pb.address, pb.receiver_id, layout, pb.backend_data, pb.transport
    )
