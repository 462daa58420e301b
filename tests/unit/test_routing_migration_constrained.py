"""A migrated constrained request tells the new worker which prompt tokens are output already
(``GenerateRequest.resumed_output_tokens``), so its grammar replays them; the engine side of the
replay is tested in tests/engine/test_constrained_decoding.py."""

from __future__ import annotations

from pdmesh.v1 import common_pb2
from tests.unit.test_routing_migration import migrate


def test_migration_keeps_the_grammar_and_counts_the_resumed_tokens() -> None:
    params = common_pb2.SamplingParams(json_schema='{"type": "object"}', logit_bias={5: -100.0})
    _, sent = migrate(params, [3, 4, 5])
    assert list(sent.token_ids) == [1, 2, 3, 4, 5]
    assert sent.resumed_output_tokens == 3
    assert sent.sampling_params.json_schema == '{"type": "object"}'
    assert dict(sent.sampling_params.logit_bias) == {5: -100.0}
