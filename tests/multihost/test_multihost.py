"""pdmesh across three network-namespace hosts (``harness.testbed``): A runs the Consul server,
tokenizer, router-a and the gateway; B a prefill; C a decode and router-c; B and C each their
own Consul client agent joined to A over gossip. Every service binds and registers its host's
address, and the KV of a disaggregated request moves from B to C with Mooncake over tcp
across the veth links (the decode asked for rdma on mlx5_0, which no host has: the fallback
is reported).

The default suite runs these (about a minute on 2 cores, most of it model loads);
``make test-multihost`` runs them with the host faults of ``test_multihost_faults.py``.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request

import grpc
import pytest

from harness.testbed import MultiHostBed
from pdmesh.discovery import GATEWAY, PREFILL, ROUTER, TOKENIZER, WORKER
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.multihost.conftest import needs_netns

pytestmark = [needs_netns, pytest.mark.model]

# long enough for the PD pair (--disagg-min-prompt-tokens 4 in the bed)
PROMPT = "Name three colours of the rainbow, one per line, and nothing else."
SERVICE = {"tokenizer": TOKENIZER, "router": ROUTER, "gateway": GATEWAY, "prefill": PREFILL}


def _rooms(bed: MultiHostBed, name: str) -> int:
    return int(bed.load_of(name).total_rooms)  # type: ignore[attr-defined]


def _stream_chat(bed: MultiHostBed, max_tokens: int = 8) -> tuple[str, str]:
    """(content, finish_reason) of a streamed chat completion through the gateway on A."""
    body = {
        "model": bed.model_name(),
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    request = urllib.request.Request(
        f"{bed.gateway_url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    content, finish = "", ""
    with urllib.request.urlopen(request, timeout=60) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            content += choice["delta"].get("content") or ""
            finish = choice.get("finish_reason") or finish
    return content, finish


def test_every_service_registers_its_own_host_address_through_its_hosts_agent(
    bed: MultiHostBed,
) -> None:
    members = bed.members()
    assert members == {"host-a": 1, "host-b": 1, "host-c": 1}, members
    # each agent sees the others over gossip, not only the server
    assert bed.members("c").get("host-b") == 1
    for s in bed.services.values():
        entries = bed.catalog(SERVICE.get(s.role, WORKER), passing=True)
        mine = [e for e in entries if e["Service"]["Port"] == s.port]  # type: ignore[index]
        mine = [e for e in mine if e["Service"]["Address"] == bed.net.address(s.host)]  # type: ignore[index]
        assert len(mine) == 1, (s.name, entries)
        node = mine[0]["Node"]
        assert node["Node"] == f"host-{s.host}", (s.name, node)  # type: ignore[index]
        assert node["Address"] == bed.net.gossip_address(s.host)  # type: ignore[index]
    # router-c listens on the wildcard and registers its --advertise-address (checked above)
    assert "listening on 0.0.0.0:50052" in bed.services["router-c"].proc.log  # type: ignore[union-attr]
    # no address of the bed in this test's own namespace
    own = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True)
    assert "10.77." not in own.stdout


def test_the_workers_show_their_kv_transport_in_consul_and_their_logs(bed: MultiHostBed) -> None:
    (prefill,) = bed.catalog(PREFILL)
    assert prefill["Service"]["Meta"]["kv_protocol"] == "tcp"  # type: ignore[index]
    assert "ib_device" not in prefill["Service"]["Meta"]  # type: ignore[operator,index]
    (decode,) = bed.catalog(WORKER)
    meta = decode["Service"]["Meta"]  # type: ignore[index]
    assert meta["kv_protocol"] == "tcp" and meta["ib_device"] == "mlx5_0", meta  # type: ignore[index]
    decode_log = bed.services["decode-c"].proc.log  # type: ignore[union-attr]
    assert "mooncake KV receiver on 10.77.0.3: transport tcp (--kv-transfer-protocol rdma" in (
        decode_log
    )
    assert "fell back to tcp" in decode_log
    assert "protocol: rdma" in decode_log  # Mooncake's own line: the flag reached it
    prefill_log = bed.services["prefill-b"].proc.log  # type: ignore[union-attr]
    assert "mooncake KV sender on 10.77.0.2: transport tcp (auto: no RDMA device" in prefill_log


def test_a_stream_through_the_gateway_moves_its_kv_from_b_to_c(bed: MultiHostBed) -> None:
    rooms = _rooms(bed, "prefill-b"), _rooms(bed, "decode-c")
    content, finish = _stream_chat(bed)
    assert content.strip() and finish == "length", (content, finish)
    assert _rooms(bed, "prefill-b") > rooms[0] and _rooms(bed, "decode-c") > rooms[1]
    prefill_log = bed.services["prefill-b"].proc.log  # type: ignore[union-attr]
    assert "decode 10.77.0.3:50053 registered" in prefill_log
    assert "KV over mooncake tcp to 10.77.0.3:" in prefill_log
    decode_log = bed.services["decode-c"].proc.log  # type: ignore[union-attr]
    assert "registered with prefill 10.77.0.2:8998" in decode_log
    assert "KV over mooncake tcp" in decode_log
    assert bed.pages_held(within=10) == {"prefill-b": 0, "decode-c": 0}


def test_the_router_on_c_serves_the_pair_too(bed: MultiHostBed) -> None:
    rooms = _rooms(bed, "decode-c")
    request = router_pb2.RouterGenerateRequest(
        text=PROMPT, sampling_params=common_pb2.SamplingParams(max_new_tokens=4, ignore_eos=True)
    )
    with grpc.insecure_channel(bed.local("router-c")) as channel:
        replies = list(router_pb2_grpc.RouterServiceStub(channel).Generate(request, timeout=60))
    assert sum(len(r.token_ids) for r in replies) == 4  # raw text: often whitespace
    assert replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert _rooms(bed, "decode-c") > rooms
    assert bed.pages_held(within=10) == {"prefill-b": 0, "decode-c": 0}
