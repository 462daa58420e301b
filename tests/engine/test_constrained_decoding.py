"""Constrained decoding (json_schema / regex / ebnf) and logit_bias on the default model."""

from __future__ import annotations

import json
import re

import jsonschema
import llguidance
import pytest
import torch

from pdmesh.engine import FinishReason, InvalidRequestError, LLMEngine, SamplingParams
from pdmesh.engine.grammar import JSON_LAYOUT, MaskFiller
from pdmesh.models import loader
from pdmesh.tokenizer.tokenizer import Tokenizer
from tests.engine.conftest import (
    EngineFactory,
    assert_all_pages_free,
    probe_overlap,
    run_all,
    tokens_of,
)

pytestmark = pytest.mark.model

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
QUESTIONS = [
    "Give me a person as JSON.",
    "Describe your best friend.",
    "What is the capital of France?",
    "List three prime numbers.",
    "Write a haiku about the sea.",
    "Who wrote Hamlet?",
    "Name a color.",
    "What is 2 + 2?",
]


@pytest.fixture(scope="module")
def tok(default_source: loader.ModelSource) -> Tokenizer:
    assert default_source.path is not None
    return Tokenizer.from_dir(default_source.path)


def chat(tok: Tokenizer, text: str) -> list[int]:
    # SmolLM2's chat format without its default system message: short prompts, fast tests
    return tok.encode(
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )


@pytest.fixture(scope="module")
def engine(make_engine: EngineFactory) -> LLMEngine:
    return make_engine()


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    return run_all(engine)


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)  # type: ignore[arg-type]


def test_json_schema_output_parses_and_validates(engine: LLMEngine, tok: Tokenizer) -> None:
    params = greedy(max_new_tokens=48, json_schema=json.dumps(PERSON))
    sampled = SamplingParams(
        temperature=0.8, seed=3, max_new_tokens=48, json_schema=json.dumps(PERSON)
    )
    reqs = {f"g{i}": (chat(tok, q), params) for i, q in enumerate(QUESTIONS[:2])}
    reqs["s"] = (chat(tok, QUESTIONS[0]), sampled)
    outs = run(engine, reqs)
    for rid in reqs:
        assert outs[rid][-1].finish_reason is FinishReason.STOP, rid
        value = json.loads(tok.decode(tokens_of(outs[rid])))
        jsonschema.validate(value, PERSON)
    assert_all_pages_free(engine)


def test_regex_and_ebnf_outputs_match(engine: LLMEngine, tok: Tokenizer) -> None:
    phone = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"
    reqs = {
        "regex": (chat(tok, "Give me a phone number."), greedy(max_new_tokens=24, regex=phone)),
        "gbnf": (
            chat(tok, "Is the sky blue?"),
            greedy(max_new_tokens=8, ebnf='root ::= answer "."\nanswer ::= "yes" | "no"'),
        ),
        "lark": (
            chat(tok, "Count to three."),
            greedy(max_new_tokens=16, ebnf='start: NUM (", " NUM)*\nNUM: /[1-9]/'),
        ),
    }
    outs = run(engine, reqs)
    texts = {rid: tok.decode(tokens_of(o)) for rid, o in outs.items()}
    assert re.fullmatch(phone, texts["regex"]), texts
    assert texts["gbnf"] in ("yes.", "no."), texts
    assert outs["regex"][-1].finish_reason is FinishReason.STOP
    assert outs["gbnf"][-1].finish_reason is FinishReason.STOP
    # the Lark grammar may go on (", 4") until max_new_tokens: every prefix must still match
    assert re.fullmatch(r"[1-9](, [1-9])*(,( )?)?", texts["lark"]), texts


def test_logit_bias_forces_and_bans_a_token(engine: LLMEngine, tok: Tokenizer) -> None:
    prompt = chat(tok, "What is the capital of France?")
    free = tokens_of(run(engine, {"free": (prompt, greedy(max_new_tokens=6))})["free"])
    forced_id = tok.encode(" banana", add_special_tokens=False)[0]
    outs = run(
        engine,
        {
            "forced": (prompt, greedy(max_new_tokens=4, logit_bias=((forced_id, 100.0),))),
            "banned": (prompt, greedy(max_new_tokens=6, logit_bias=((free[0], -100.0),))),
        },
    )
    assert tokens_of(outs["forced"]) == [forced_id] * 4
    banned = tokens_of(outs["banned"])
    assert banned[0] != free[0] and free[0] not in banned


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_mixed_batch_free_rows_equal_the_unconstrained_run(
    make_engine: EngineFactory, engine: LLMEngine, tok: Tokenizer, overlap: bool
) -> None:
    free = greedy(max_new_tokens=10)
    constrained = greedy(max_new_tokens=10, json_schema=json.dumps(PERSON))
    prompts = [chat(tok, q) for q in QUESTIONS]
    alone = run(engine, {f"f{i}": (p, free) for i, p in enumerate(prompts)})
    # CPU engines run without the overlap by default; forced on, a step with constrained rows
    # is launched while the step before is in flight, and samples once that one resolved
    mixed_engine = make_engine(disable_overlap_schedule=False) if overlap else engine
    probe = probe_overlap(mixed_engine)
    reqs = {f"f{i}": (p, free) for i, p in enumerate(prompts)}
    reqs |= {f"c{i}": (p, constrained) for i, p in enumerate(prompts)}
    mixed = run(mixed_engine, reqs)
    for i in range(len(prompts)):
        assert tokens_of(mixed[f"f{i}"]) == tokens_of(alone[f"f{i}"]), i
        text = tok.decode(tokens_of(mixed[f"c{i}"]))
        assert text.startswith('{"name": "'), text
    assert_all_pages_free(mixed_engine)
    if overlap:
        assert probe.in_flight == probe.schedules - 1 and probe.deferred >= 9, probe
    else:
        assert probe.in_flight == probe.deferred == 0, probe


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (greedy(json_schema='{"type": "nonsense"}'), "sampling_params.json_schema"),
        (greedy(json_schema="{not json"), "sampling_params.json_schema"),
        (greedy(regex="(unclosed"), "sampling_params.regex"),
        (greedy(ebnf="root ::= ( "), "sampling_params.ebnf"),
        (greedy(regex="a", ebnf='root ::= "a"'), "sampling_params.ebnf"),
        (greedy(logit_bias=((49152, 1.0),)), "sampling_params.logit_bias"),
        (greedy(logit_bias=((5, 101.0),)), "sampling_params.logit_bias"),
    ],
)
def test_bad_constraints_are_refused_naming_the_field_before_admission(
    engine: LLMEngine, tok: Tokenizer, params: SamplingParams, field: str
) -> None:
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("bad", chat(tok, "Hi"), params)
    assert e.value.field == field
    assert "bad" not in engine._seqs
    assert_all_pages_free(engine)
    # the failure is cached: the same text fails again without compiling
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad", chat(tok, "Hi"), params)


def test_preemption_keeps_the_constrained_output(
    make_engine: EngineFactory, engine: LLMEngine, tok: Tokenizer
) -> None:
    params = greedy(max_new_tokens=24, json_schema=json.dumps(PERSON))
    reqs = {f"r{i}": (chat(tok, q), params) for i, q in enumerate(QUESTIONS[:4])}
    roomy = run(engine, reqs)
    tight_engine = make_engine(num_pages=16, page_size=4)
    tight = run(tight_engine, reqs)
    assert tight_engine.load().num_preemptions > 0
    for rid in reqs:
        assert tokens_of(tight[rid]) == tokens_of(roomy[rid]), rid
        jsonschema.validate(json.loads(tok.decode(tokens_of(tight[rid]))), PERSON)
    assert_all_pages_free(tight_engine)


def test_resumed_output_tokens_replay_through_the_grammar(
    engine: LLMEngine, tok: Tokenizer
) -> None:
    # what a migration sends: prompt + the tokens already streamed, and how many those are
    prompt = chat(tok, QUESTIONS[0])
    params = greedy(max_new_tokens=48, json_schema=json.dumps(PERSON))
    whole = tokens_of(run(engine, {"whole": (prompt, params)})["whole"])
    k = 5
    resumed = greedy(max_new_tokens=48 - k, json_schema=json.dumps(PERSON), resumed_output_tokens=k)
    rest = run(engine, {"moved": (prompt + whole[:k], resumed)})["moved"]
    assert whole[:k] + tokens_of(rest) == whole
    assert rest[-1].finish_reason is FinishReason.STOP
    # tokens the grammar cannot have produced are refused, naming the field
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("wrong", prompt, resumed)  # the prompt's tail is not JSON
    assert e.value.field == "resumed_output_tokens"
    assert_all_pages_free(engine)


def test_pd_decode_side_advances_its_matcher_with_the_prefill_token(
    make_engine: EngineFactory, engine: LLMEngine, tok: Tokenizer
) -> None:
    prompt = chat(tok, QUESTIONS[1])
    params = greedy(max_new_tokens=40, json_schema=json.dumps(PERSON))
    whole = tokens_of(run(engine, {"agg": (prompt, params)})["agg"])
    prefill, decode = engine, make_engine()
    prefill.add_request("pd", prompt, params, prefill_only=True)
    first = run_all(prefill)["pd"][-1]
    assert first.prefill_page_ids is not None
    pages = decode.allocate_incoming("pd", prompt, params)
    decode.write_pages(pages, prefill.read_pages(first.prefill_page_ids))
    prefill.release("pd")
    out = [decode.start_decode("pd", first.new_token_ids[0])]
    out += run_all(decode).get("pd", [])
    assert tokens_of(out) == whole
    # a first token the grammar forbids (a prefill that does not constrain) fails clearly
    decode.allocate_incoming("bad-first", prompt, params)
    bad = decode.start_decode("bad-first", tok.encode("Hello", add_special_tokens=False)[0])
    assert bad.finish_reason is FinishReason.ERROR and "grammar" in (bad.error or "")
    assert_all_pages_free(decode)
    assert_all_pages_free(prefill)


def test_grammars_are_compiled_once(engine: LLMEngine) -> None:
    a = engine.grammars.compile("regex", "[a-c]{2}")
    assert engine.grammars.compile("regex", "[a-c]{2}") is a
    assert engine.grammars.compile("ebnf", 'root ::= "a"') is not a


def test_a_model_without_a_tokenizer_refuses_grammars(make_tiny_engine: EngineFactory) -> None:
    tiny = make_tiny_engine()
    with pytest.raises(InvalidRequestError) as e:
        tiny.add_request("r", [1, 2, 3], greedy(regex="a+"))
    assert e.value.field == "sampling_params.regex"
    tiny.add_request("b", [1, 2, 3], greedy(max_new_tokens=3, logit_bias=((7, 100.0),)))
    assert tokens_of(run_all(tiny)["b"]) == [7, 7, 7]


def test_json_slices_change_no_mask(engine: LLMEngine, tok: Tokenizer) -> None:
    # JSON grammars are compiled against a tokenizer with llguidance's JSON slices (grammar.py
    # NOTE): the masks along a greedy JSON output equal those of the general slices
    schema = json.dumps({"type": "object", "properties": {"text": {"type": "string"}}})
    grammars = engine.grammars
    fast = grammars.compile("json_schema", schema).matcher()
    general = grammars.tokenizer()
    assert general is not None and general is not grammars.tokenizer(json=True)
    reference = llguidance.LLMatcher(
        general, llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    )
    outs = run(
        engine,
        {"json": (chat(tok, QUESTIONS[1]), greedy(max_new_tokens=24, json_schema=schema))},
    )
    filler = MaskFiller(engine.runner.model.config.vocab_size)
    for token in tokens_of(outs["json"]):
        a, b = filler.fill([fast]).clone(), filler.fill([reference]).clone()
        assert torch.equal(a, b), token
        assert fast.consume_token(token) and reference.consume_token(token)
