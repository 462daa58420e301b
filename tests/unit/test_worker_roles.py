"""The worker's roles (``services.worker.roles``): which role a config gets, and what each one
tells the one server — names it carries, Consul service and tag, GetModelInfo's role — without
an engine (opening a PD side needs one: the integration tests do that)."""

from __future__ import annotations

import pytest

from pdmesh.discovery import PREFILL, TAG_AGG, TAG_DECODE, TAG_PREFILL, WORKER
from services.worker.config import PrefillServiceConfig, WorkerServiceConfig
from services.worker.roles import (
    KV_RECEIVER_SERVICE,
    AggregatedRole,
    DecodeRole,
    PrefillRole,
    role_for,
)


def test_each_config_gets_its_role() -> None:
    assert type(role_for(WorkerServiceConfig())) is AggregatedRole
    assert type(role_for(WorkerServiceConfig(mode="decode"))) is DecodeRole
    assert type(role_for(PrefillServiceConfig())) is PrefillRole


@pytest.mark.parametrize(
    ("role", "name", "service", "tag"),
    [
        (AggregatedRole(WorkerServiceConfig()), "aggregated", WORKER, TAG_AGG),
        (DecodeRole(WorkerServiceConfig(mode="decode")), "decode", WORKER, TAG_DECODE),
        (PrefillRole(PrefillServiceConfig()), "prefill", PREFILL, TAG_PREFILL),
    ],
)
def test_roles_register_as_before(role: object, name: str, service: str, tag: str) -> None:
    assert (role.name, role.service, role.tag) == (name, service, tag)  # type: ignore[attr-defined]


def test_only_a_grpc_decode_hosts_the_kv_receiver() -> None:
    grpc = WorkerServiceConfig(mode="decode", kv_transfer_backend="grpc")
    assert DecodeRole(grpc).service_names() == [KV_RECEIVER_SERVICE]
    assert DecodeRole(WorkerServiceConfig(mode="decode")).service_names() == []
    aggregated_grpc = WorkerServiceConfig(kv_transfer_backend="grpc")
    assert AggregatedRole(aggregated_grpc).service_names() == []
    assert PrefillRole(PrefillServiceConfig(kv_transfer_backend="grpc")).service_names() == []


def test_the_bootstrap_port_is_the_prefills_alone() -> None:
    # the one a prefill advertises is the bound one, known once its bootstrap server started
    assert AggregatedRole(WorkerServiceConfig()).bootstrap_port == 0
    assert PrefillRole(PrefillServiceConfig()).bootstrap_port == 0


def test_roles_without_a_side_have_nothing_to_close() -> None:
    import asyncio

    async def lifecycle() -> None:
        for role in (
            AggregatedRole(WorkerServiceConfig()),
            DecodeRole(WorkerServiceConfig(mode="decode")),
            PrefillRole(PrefillServiceConfig()),
        ):
            await role.drained()
            await role.close()

    asyncio.run(lifecycle())
    assert AggregatedRole(WorkerServiceConfig()).meta() == {}


def test_the_worker_command_picks_the_role_from_mode() -> None:
    from services.worker.__main__ import role_of

    assert role_of(["--port", "0"]) is None
    assert role_of(["--mode", "prefill", "--port", "0"]) == "prefill"
    assert role_of(["--mode=decode"]) == "decode"
    assert role_of(["--mode"]) is None  # the worker's parser reports it


def test_the_aliases_build_the_same_command_lines() -> None:
    from services.decode import __main__ as decode
    from services.prefill import __main__ as prefill
    from services.worker import __main__ as worker

    assert decode.build_parser is worker.build_parser and decode.main is worker.main
    assert prefill.build_parser is worker.build_prefill_parser
    assert prefill.main is worker.prefill_main


def test_only_streaming_roles_advertise_a_migration_limit() -> None:
    assert AggregatedRole(WorkerServiceConfig(migration_limit=3)).migration_limit == 3
    assert DecodeRole(WorkerServiceConfig(mode="decode", migration_limit=2)).migration_limit == 2
    assert PrefillRole(PrefillServiceConfig()).migration_limit == 0
