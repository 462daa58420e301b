"""SGLang's scheduler protocol ↔ pdmesh's worker protocol, both directions (no model, no network):
the servicer's conversion on pdmesh workers (``services.sglang_grpc.convert``) and the router's
client adapter (``services.sglang_grpc.client``), including a round trip through both."""

from __future__ import annotations

import pytest
from google.protobuf.struct_pb2 import Struct

from pdmesh.errors import InvalidRequestError
from pdmesh.sglang import sglang_scheduler_pb2 as sgl
from pdmesh.v1 import common_pb2, worker_pb2
from services.sglang_grpc import client, convert


def sgl_request(**params: object) -> sgl.GenerateRequest:
    return sgl.GenerateRequest(
        request_id="r1",
        tokenized=sgl.TokenizedInput(input_ids=[5, 6, 7]),
        sampling_params=sgl.SamplingParams(**params),  # type: ignore[arg-type]
    )


# -- servicer side: SGLang request → pdmesh request --------------------------------------------


def test_proto3_zeros_take_sglang_semantic_defaults() -> None:
    out = convert.generate_request_from_pb(sgl_request())
    p = out.sampling_params
    assert list(out.token_ids) == [5, 6, 7]
    assert p.temperature == 0.0  # 0 is greedy in SGLang too
    assert (p.top_p, p.repetition_penalty) == (1.0, 1.0)  # a 0 here cannot be meant
    assert p.top_k == 0  # off in pdmesh, as -1 is in SGLang
    assert p.max_new_tokens == convert.SGLANG_MAX_NEW_TOKENS  # unset max_new_tokens
    assert not p.HasField("seed") and not p.logprobs


def test_set_values_pass_through() -> None:
    req = sgl_request(
        temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1,
        frequency_penalty=0.5, presence_penalty=-0.5, max_new_tokens=0, min_new_tokens=0,
        stop_token_ids=[9], ignore_eos=True, n=1,
    )  # fmt: skip
    req.return_logprob, req.top_logprobs_num = True, 3
    p = convert.generate_request_from_pb(req).sampling_params
    assert p.top_k == 40 and p.max_new_tokens == 0 and list(p.stop_token_ids) == [9]
    assert p.top_p == pytest.approx(0.9) and p.repetition_penalty == pytest.approx(1.1)
    assert p.ignore_eos and p.logprobs and p.top_logprobs == 3


def test_negative_int32_rooms_map_alike_on_both_halves() -> None:
    prefill = sgl_request()
    prefill.disaggregated_params.bootstrap_room = -5
    decode = sgl_request()
    decode.disaggregated_params.CopyFrom(
        sgl.DisaggregatedParams(bootstrap_host="::1", bootstrap_port=8998, bootstrap_room=-5)
    )
    p, d = convert.generate_request_from_pb(prefill), convert.generate_request_from_pb(decode)
    assert p.disagg.bootstrap_room == d.disagg.bootstrap_room == (1 << 32) - 5
    assert p.disagg.bootstrap_address == ""
    assert d.disagg.bootstrap_address == "[::1]:8998"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.ClearField("tokenized"), "tokenized.input_ids"),
        (lambda r: setattr(r.sampling_params, "n", 2), "sampling_params.n"),
        # regex / json_schema / ebnf_grammar and logit_bias are mapped (test_sampling_constraints)
        (
            lambda r: setattr(r.sampling_params, "structural_tag", "{}"),
            "sampling_params.structural_tag",
        ),
        (lambda r: r.sampling_params.logit_bias.update({"x": 1.0}), "sampling_params.logit_bias"),
        (lambda r: r.mm_inputs.image_urls.append("http://x/a.png"), "mm_inputs"),
        (lambda r: setattr(r, "lora_id", "a"), "lora_id"),
    ],
)
def test_what_pdmesh_cannot_do_is_refused_naming_the_field(change: object, field: str) -> None:
    req = sgl_request()
    change(req)  # type: ignore[operator]
    with pytest.raises(InvalidRequestError) as e:
        convert.generate_request_from_pb(req)
    assert e.value.field == field


# -- servicer side: pdmesh replies → SGLang responses ------------------------------------------


def replies() -> list[worker_pb2.GenerateResponse]:
    lp = [common_pb2.TokenLogprob(token_id=t, logprob=-0.5 * t) for t in (11, 12, 13)]
    return [
        worker_pb2.GenerateResponse(token_ids=[11], logprobs=lp[:1]),
        worker_pb2.GenerateResponse(token_ids=[12], logprobs=lp[1:2]),
        worker_pb2.GenerateResponse(
            token_ids=[13],
            logprobs=lp[2:],
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=3, cached_tokens=2),
        ),
    ]


def test_streamed_replies_are_chunks_then_one_complete_with_every_token() -> None:
    stream = convert.ReplyStream("r1", num_prompt_tokens=3, stream=True)
    out = [r for reply in replies() for r in stream.push(reply)]
    kinds = [r.WhichOneof("response") for r in out]
    assert kinds == ["chunk", "chunk", "chunk", "complete"]
    assert [list(r.chunk.token_ids) for r in out[:3]] == [[11], [12], [13]]
    assert [r.chunk.completion_tokens for r in out[:3]] == [1, 2, 3]  # totals so far
    assert list(out[2].chunk.output_logprobs.token_ids) == [11, 12, 13]  # totals so far
    done = out[-1].complete
    assert list(done.output_ids) == [11, 12, 13] and done.finish_reason == "stop"
    assert (done.prompt_tokens, done.completion_tokens, done.cached_tokens) == (3, 3, 2)
    assert done.matched_token_id == 13  # workers stop on token ids only


def test_unstreamed_replies_are_one_complete() -> None:
    stream = convert.ReplyStream("r1", num_prompt_tokens=3, stream=False)
    out = [r for reply in replies() for r in stream.push(reply)]
    assert [r.WhichOneof("response") for r in out] == ["complete"]
    assert list(out[0].complete.output_ids) == [11, 12, 13]


def test_a_failed_request_becomes_an_error_not_a_complete() -> None:
    stream = convert.ReplyStream("r1", num_prompt_tokens=3, stream=True)
    failed = worker_pb2.GenerateResponse(
        finish_reason=common_pb2.FINISH_REASON_ERROR, error="prefill lost"
    )
    with pytest.raises(convert.WorkerError, match="prefill lost"):
        stream.push(failed)


# -- router side: pdmesh request → SGLang request, SGLang replies → pdmesh replies ---------------


class Handle:
    def __init__(self, role: str, bootstrap_address: str = "") -> None:
        self.role = role
        self.bootstrap_address = bootstrap_address


def test_unset_pdmesh_fields_are_sent_as_sglang_semantic_values() -> None:
    req = worker_pb2.GenerateRequest(request_id="r", token_ids=[1, 2])
    out = client.generate_request_to_pb(req, Handle("aggregated"))
    p = out.sampling_params
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.n) == (1.0, 1.0, -1, 1.0, 1)
    assert p.max_new_tokens == 128 and p.skip_special_tokens and out.stream
    assert not out.HasField("disaggregated_params")


def test_disaggregated_halves_carry_the_prefills_bootstrap_server_and_one_room() -> None:
    room = (1 << 62) + 7  # a 63-bit router room
    prefill_req = worker_pb2.GenerateRequest(
        token_ids=[1], disagg=worker_pb2.DisaggParams(bootstrap_room=room)
    )
    decode_req = worker_pb2.GenerateRequest(
        token_ids=[1],
        disagg=worker_pb2.DisaggParams(bootstrap_room=room, bootstrap_address="10.0.0.5:8998"),
    )
    p = client.generate_request_to_pb(prefill_req, Handle("prefill", "10.0.0.5:8998"))
    d = client.generate_request_to_pb(decode_req, Handle("decode"))
    assert p.disaggregated_params == d.disaggregated_params
    assert d.disaggregated_params.bootstrap_host == "10.0.0.5"
    assert d.disaggregated_params.bootstrap_port == 8998
    assert 0 <= d.disaggregated_params.bootstrap_room == 7 < 2**31


def test_complete_repeating_or_not_the_streamed_tokens_yields_each_token_once() -> None:
    chunk = sgl.GenerateResponse(chunk=sgl.GenerateStreamChunk(token_ids=[4, 5]))
    for output_ids in ([4, 5, 6], [6]):  # cumulative (pdmesh, SGLang) or delta
        reader = client.ReplyReader()
        first = reader.convert(chunk)
        last = reader.convert(
            sgl.GenerateResponse(
                complete=sgl.GenerateComplete(
                    output_ids=output_ids, finish_reason="length", completion_tokens=3
                )
            )
        )
        assert list(first.token_ids) + list(last.token_ids) == [4, 5, 6]
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert reader.finished


def test_an_unknown_finish_reason_is_an_error() -> None:
    reader = client.ReplyReader()
    out = reader.convert(sgl.GenerateResponse(complete=sgl.GenerateComplete(finish_reason="x")))
    assert out.finish_reason == common_pb2.FINISH_REASON_ERROR and "'x'" in out.error


def test_round_trip_through_both_adapters_keeps_tokens_logprobs_and_usage() -> None:
    stream = convert.ReplyStream("r1", num_prompt_tokens=3, stream=True)
    reader = client.ReplyReader()
    back = [reader.convert(r) for reply in replies() for r in stream.push(reply)]
    assert [t for b in back for t in b.token_ids] == [11, 12, 13]
    assert [lp.token_id for b in back for lp in b.logprobs] == [11, 12, 13]
    assert back[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert back[-1].usage == replies()[-1].usage


def test_model_info_reads_role_and_bootstrap_port_from_server_args() -> None:
    args = Struct()
    args.update({"disaggregation_mode": "prefill", "disaggregation_bootstrap_port": 8998})
    args.update({"page_size": 16, "pdmesh_migration_limit": 2})
    info = client.model_info_from_pb(
        sgl.GetModelInfoResponse(served_model_name="m", max_context_length=2048, vocab_size=9),
        sgl.GetServerInfoResponse(server_args=args),
    )
    assert (info.role, info.bootstrap_port, info.page_size) == ("prefill", 8998, 16)
    assert (info.model_name, info.max_model_len, info.migration_limit) == ("m", 2048, 2)
    plain = client.model_info_from_pb(
        sgl.GetModelInfoResponse(model_path="/m"), sgl.GetServerInfoResponse()
    )
    assert (plain.role, plain.model_name) == ("aggregated", "/m")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("sglang-grpc://10.0.0.5:30000", ("sglang-grpc", "10.0.0.5:30000")),
        ("10.0.0.5:30000", ("pdmesh", "10.0.0.5:30000")),
    ],
)
def test_worker_addresses_name_their_kind(address: str, expected: tuple[str, str]) -> None:
    assert client.split_address(address) == expected


def test_an_unknown_scheme_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="sglang-grpc://"):
        client.split_address("http://10.0.0.5:30000")
