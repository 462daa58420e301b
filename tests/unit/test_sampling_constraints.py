"""Constraint and logit_bias fields at every edge that converts sampling params (no model)."""

from __future__ import annotations

import pytest

from pdmesh.engine import InvalidRequestError, SamplingParams
from pdmesh.sglang import sglang_scheduler_pb2 as sgl
from pdmesh.v1 import common_pb2, worker_pb2
from services.sglang_grpc import client as sglang_client
from services.sglang_grpc import convert as sglang_convert
from services.worker import convert as worker_convert


def test_worker_request_maps_constraints_bias_and_resumed_tokens() -> None:
    pb = worker_pb2.GenerateRequest(
        token_ids=[1, 2, 3],
        sampling_params=common_pb2.SamplingParams(
            json_schema='{"type": "object"}', logit_bias={7: -100.0, 3: 2.5}
        ),
        resumed_output_tokens=2,
    )
    p = worker_convert.request_params_from_pb(pb)
    assert p.constraint == ("json_schema", '{"type": "object"}')
    assert p.logit_bias == ((3, 2.5), (7, -100.0))
    assert p.resumed_output_tokens == 2
    assert worker_convert.sampling_params_from_pb(common_pb2.SamplingParams()).constraint is None
    # an empty string is a grammar (presence, not truthiness): it matches only ""
    empty = common_pb2.SamplingParams(regex="")
    assert worker_convert.sampling_params_from_pb(empty).constraint == ("regex", "")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(json_schema="{}", regex="a"), "sampling_params.regex"),
        (SamplingParams(regex="a", ebnf="root ::= x"), "sampling_params.ebnf"),
        (SamplingParams(logit_bias=((5, 1.0), (5, 2.0))), "sampling_params.logit_bias"),
        (SamplingParams(logit_bias=((5, float("nan")),)), "sampling_params.logit_bias"),
        (SamplingParams(logit_bias=((5, -100.5),)), "sampling_params.logit_bias"),
        (SamplingParams(logit_bias=((-1, 1.0),)), "sampling_params.logit_bias"),
        (SamplingParams(resumed_output_tokens=-1), "resumed_output_tokens"),
    ],
)
def test_bad_fields_are_named(params: SamplingParams, field: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        params.validate(vocab_size=100)
    assert e.value.field == field


def test_sglang_requests_carry_constraints_and_bias() -> None:
    req = sgl.GenerateRequest(
        request_id="r",
        tokenized=sgl.TokenizedInput(input_ids=[1, 2]),
        sampling_params=sgl.SamplingParams(ebnf_grammar='root ::= "a"', logit_bias={"9": 1.5}),
    )
    out = sglang_convert.generate_request_from_pb(req).sampling_params
    assert out.HasField("ebnf") and out.ebnf == 'root ::= "a"'
    assert dict(out.logit_bias) == {9: 1.5}
    # the engine's field names become SGLang's
    err = sglang_convert.sglang_error(InvalidRequestError("sampling_params.ebnf", "bad"))
    assert err.field == "sampling_params.ebnf_grammar"


class _View:
    role = "aggregated"
    bootstrap_address = ""


def test_the_sglang_client_sends_constraints_and_refuses_a_constrained_resume() -> None:
    pb = worker_pb2.GenerateRequest(
        request_id="r",
        token_ids=[1, 2, 3],
        sampling_params=common_pb2.SamplingParams(regex="[0-9]+", logit_bias={4: -3.0}),
    )
    out = sglang_client.generate_request_to_pb(pb, _View())
    assert out.sampling_params.regex == "[0-9]+"
    assert dict(out.sampling_params.logit_bias) == {"4": -3.0}
    pb.resumed_output_tokens = 1
    with pytest.raises(InvalidRequestError) as e:
        sglang_client.generate_request_to_pb(pb, _View())
    assert e.value.field == "resumed_output_tokens"
