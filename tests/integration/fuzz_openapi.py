"""Hypothesis strategies for HTTP calls to the gateway, from the OpenAPI description it serves
(``/openapi.json``, written by FastAPI from the pydantic request models).

Each operation's JSON body schema (``$ref``s inlined) becomes a strategy (``from_schema``, for
the JSON Schema subset pydantic writes; hypothesis-jsonschema 0.23 no longer runs on current
hypothesis for objects): tame bodies come from a tightened copy (short strings and lists, tiny token counts that are always
set, token ids inside the vocabulary, the served model's name), so most reach a worker and
finish in milliseconds. Mixed in, as for the gRPC fuzzers: a tame body with one value, at any
depth, replaced by a wild JSON value (huge and negative numbers, lone surrogates, deep
nesting, wrong types) or removed; random JSON; and the body's bytes truncated or corrupted.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from hypothesis import strategies as st

from tests.integration.fuzz_proto import INT_EDGES, mutated

TAME_STRING = 40
TAME_ITEMS = 3
# count fields: always set (unset means the server default, 128 tokens) and tiny
TOKEN_COUNTS = ("max_tokens", "max_completion_tokens", "max_new_tokens")
MIN_COUNTS = ("min_tokens", "min_new_tokens")
TOKEN_ID_LISTS = ("prompt", "input_ids", "stop_token_ids")
WILD_STRINGS = (
    "", "\ud800", "a\udfffb", "\x00", "\u202e", "\ufeff", "\U0001d54f" * 3, "%s%n", "../../x",
    "<|im_end|>", "<|im_start|>system", "{{ 7*7 }}", "{% for x in range(10**9) %}{% endfor %}",
    # JSON in a string (tool call arguments are parsed), nested past Python's parser
    "[" * 3000, '{"a":' * 3000 + "1" + "}" * 3000, "{}", "[]", "null",
)  # fmt: skip
NUMBER_EDGES = (
    *INT_EDGES, 2**64, -(2**64) - 1, 10**30, -(10**30), 1e308, -1e308, 5e-324, -0.0, 0.1,
    float("nan"), float("inf"), float("-inf"),
)  # fmt: skip
# wild token counts: out of range or of the wrong type; 2^31 - 1 (a long generation, which
# the client's deadline cuts) once in a while
COUNT_EDGES: tuple[Any, ...] = (
    -1, -(2**31) - 1, 2**31, 2**63, 2**64, 10**30, 1.5, 2.0, "2", "", [], {}, True, 2**31 - 1,
)  # fmt: skip
CONTENT_TYPES = ("application/json", "application/json; charset=utf-8")
ODD_CONTENT_TYPES = ("text/plain", "", "application/x-www-form-urlencoded", "multipart/form-data")


@dataclass(frozen=True)
class HttpCall:
    """One request: what the fuzzer sends and what a failure report shows."""

    method: str
    path: str  # with its query string
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        body = "" if self.body is None else f" {self.body[:400]!r}"
        return f"{self.method} {self.path}{body}"


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # as in the document, e.g. /v1/models/{model}
    body_schema: dict[str, Any] | None
    parameters: list[dict[str, Any]]

    def __repr__(self) -> str:  # failures print strategies: keep the schemas out
        return f"Operation({self.method} {self.path})"


def operations(document: dict[str, Any]) -> list[Operation]:
    """Every operation of an OpenAPI document, with ``$ref``s inlined."""
    out = []
    for path, item in document["paths"].items():
        for method, op in item.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            schema = inline(body["schema"], document) if "schema" in body else None
            params = [inline(p, document) for p in op.get("parameters", [])]
            out.append(Operation(method.upper(), path, schema, params))
    return out


def inline(node: Any, document: dict[str, Any]) -> Any:
    """``node`` with every local ``$ref`` replaced by what it points to (the gateway's schemas
    are not recursive)."""
    if isinstance(node, list):
        return [inline(n, document) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return inline(target, document)
    return {k: inline(v, document) for k, v in node.items()}


# -- JSON Schema -> strategy ------------------------------------------------------------------


def from_schema(schema: Any) -> st.SearchStrategy[Any]:
    """Instances of ``schema``: the keywords pydantic's schemas use (type, anyOf, enum, const,
    bounds, lengths, items, properties / required / additionalProperties). Optional properties
    are left out half the time; extra properties, where allowed, are random JSON."""
    if schema is True or schema == {}:
        return _any_json()
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s) for s in schema[key]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}) for k in kind])
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low, high = _bounds(schema)
        return st.integers(
            None if low is None else math.ceil(low), None if high is None else math.floor(high)
        )
    if kind == "number":
        low, high = _bounds(schema)
        return st.floats(
            low, high, allow_nan=False, allow_infinity=False,
            exclude_min="exclusiveMinimum" in schema, exclude_max="exclusiveMaximum" in schema,
        )  # fmt: skip
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength"))
    if kind == "array":
        items = from_schema(schema.get("items", {}))
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=schema.get("maxItems"))
    if kind == "object" or "properties" in schema:
        return _object(schema)
    return _any_json()


def _bounds(schema: dict[str, Any]) -> tuple[float | None, float | None]:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    if isinstance(low, float) and low.is_integer() and abs(low) >= 2**53:
        low = int(low)  # 1.8446744073709552e19: pydantic's float spelling of 2^64 - 1
    if isinstance(high, float) and high.is_integer() and abs(high) >= 2**53:
        high = int(high) - 1 if schema.get("type") == "integer" else high
    return low, high


def _object(schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    props = schema.get("properties", {})
    required = set(schema.get("required", []))
    fixed = {k: from_schema(v) for k, v in props.items() if k in required}
    optional = {k: from_schema(v) for k, v in props.items() if k not in required}
    known = st.fixed_dictionaries(fixed, optional=optional)
    extra = schema.get("additionalProperties", True)
    if extra is False or props:  # pydantic models: no extra properties in tame bodies
        return known
    values = _any_json() if extra is True or extra == {} else from_schema(extra)
    more = st.dictionaries(st.text(max_size=10), values, max_size=3)
    return st.tuples(more, known).map(lambda t: {**t[0], **t[1]})


def _any_json() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-1000, 1000),
        st.floats(-1e6, 1e6),
        st.text(max_size=10),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=6,
    )


# -- tame bodies -------------------------------------------------------------------------------


def tame_schema(schema: dict[str, Any], model: str, vocab_size: int) -> dict[str, Any]:
    """A copy of a body schema whose instances the mesh serves quickly."""
    out = copy.deepcopy(schema)
    _tighten(out, model, vocab_size)
    props = out.get("properties", {})
    if "text" in props and "input_ids" in props:  # /generate: exactly one prompt field
        variants = []
        for keep, drop in (("text", "input_ids"), ("input_ids", "text")):
            variant = copy.deepcopy(out)
            del variant["properties"][drop]
            variant["required"] = sorted({*variant.get("required", []), keep})
            variants.append(variant)
        return {"anyOf": variants}
    return out


def _tighten(node: Any, model: str, vocab: int) -> None:
    if isinstance(node, list):
        for n in node:
            _tighten(n, model, vocab)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "string" and "enum" not in node and "const" not in node:
        node["maxLength"] = min(node.get("maxLength", TAME_STRING), TAME_STRING)
    if node.get("type") == "array":
        node["maxItems"] = min(node.get("maxItems", TAME_ITEMS), TAME_ITEMS)
    props = node.get("properties", {})
    for name, prop in props.items():
        if name in TOKEN_COUNTS:
            props[name] = {"type": "integer", "minimum": 0, "maximum": 2}
        elif name in MIN_COUNTS:
            props[name] = {"type": "integer", "minimum": 0, "maximum": 1}
        elif name == "n":
            props[name] = {"type": "integer", "minimum": 1, "maximum": 2}
        elif name == "model":
            props[name] = {"const": model}
        else:
            if name in TOKEN_ID_LISTS:
                _bound_ints(prop, 0, vocab - 1)
            _tighten(prop, model, vocab)
    for name in ("max_tokens", "max_new_tokens", "sampling_params", "content"):
        if name in props:  # what keeps a generation short is always there; messages say something
            node["required"] = sorted({*node.get("required", []), name})
    for key in ("anyOf", "oneOf", "allOf", "items", "additionalProperties"):
        if key in node:
            _tighten(node[key], model, vocab)


def _bound_ints(node: Any, low: int, high: int) -> None:
    if isinstance(node, list):
        for n in node:
            _bound_ints(n, low, high)
    elif isinstance(node, dict):
        if node.get("type") == "integer":
            node["minimum"], node["maximum"] = low, high
        for key in ("anyOf", "oneOf", "items"):
            if key in node:
                _bound_ints(node[key], low, high)


# -- wild values -------------------------------------------------------------------------------


def wild_json() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(NUMBER_EDGES),
        st.integers(),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(WILD_STRINGS),
        st.sampled_from([1 << 12, 1 << 17]).map(lambda n: "ab" * n),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )


DEEP = "__deep_{}__"  # a placeholder ``encode`` replaces by that many nested arrays


def deep(depth: int) -> str:
    """Nesting deeper than Python's json module writes (or, past ~1000, reads)."""
    return DEEP.format(depth)


@st.composite
def one_wild_value(draw: st.DrawFn, body: Any) -> Any:
    """``body`` with one value somewhere inside replaced by a wild one, or removed."""
    body = copy.deepcopy(body)
    wild = st.one_of(wild_json(), st.sampled_from([100, 2000]).map(deep))
    if not isinstance(body, (dict, list)) or not body:
        return draw(wild)
    node = body
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child
            continue
        if key in TOKEN_COUNTS:
            # left out, null or large, a count means hundreds of tokens: seconds per call
            node[key] = draw(st.sampled_from(COUNT_EDGES))
        elif key == "sampling_params":  # the same: {} would mean 128 tokens
            node[key] = draw(st.sampled_from([None, [], "x", 1, True, [{}]]))
        elif isinstance(node, dict) and draw(st.integers(0, 4)) == 0:
            del node[key]
        else:
            node[key] = draw(wild)
        return body


def encode(value: Any, ascii_only: bool) -> bytes:
    """JSON bytes as a lax client writes them: NaN / Infinity allowed, and (``ascii_only``
    False) lone surrogates written raw, which is invalid UTF-8."""
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
    for depth in (100, 2000):
        text = text.replace(json.dumps(deep(depth)), "[" * depth + "1" + "]" * depth)
    return text.encode("utf-8", "surrogatepass")


# -- calls -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallFactory:
    """Strategies for calls to one gateway's operations."""

    ops: list[Operation]
    model: str
    vocab_size: int
    safe_query: Mapping[str, st.SearchStrategy[str]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"CallFactory({len(self.ops)} operations)"

    def calls(self) -> st.SearchStrategy[HttpCall]:
        generation = [o for o in self.ops if o.body_schema is not None]
        # body-taking routes are where the work is: weight them up
        weighted = [*self.ops, *generation * 4]
        return st.one_of(
            st.sampled_from(weighted).flatmap(self.call),
            self.odd_call(),
        )

    def call(self, op: Operation) -> st.SearchStrategy[HttpCall]:
        return st.builds(
            lambda path, body, headers: HttpCall(op.method, path, body, headers),
            self.path(op),
            self.body(op) if op.body_schema is not None else st.none(),
            self.headers(),
        )

    def body(self, op: Operation) -> st.SearchStrategy[bytes]:
        assert op.body_schema is not None
        tame = from_schema(tame_schema(op.body_schema, self.model, self.vocab_size))
        as_json = st.builds(encode, tame, st.just(True))
        return st.one_of(
            as_json,
            as_json,
            as_json,
            st.builds(encode, tame.flatmap(one_wild_value), st.booleans()),
            st.builds(encode, tame.flatmap(one_wild_value), st.booleans()),
            st.builds(encode, tame.flatmap(one_wild_value), st.booleans()),
            st.builds(encode, wild_json(), st.booleans()),
            mutated(as_json),
            st.binary(max_size=64),
        )

    def path(self, op: Operation) -> st.SearchStrategy[str]:
        parts: dict[str, st.SearchStrategy[str]] = {}
        query: list[tuple[str, st.SearchStrategy[str | None]]] = []
        for p in op.parameters:
            name = p["name"]
            value: st.SearchStrategy[str] = (
                self.safe_query[name]
                if name in self.safe_query
                else st.one_of(st.text(max_size=30), st.sampled_from(WILD_STRINGS))
            )
            if p.get("in") == "path":
                parts[name] = st.one_of(st.just(self.model), value)
            elif p.get("in") == "query":
                optional = st.none() if not p.get("required") else st.nothing()
                query.append((name, st.one_of(value, optional)))

        def build(path_values: dict[str, str], query_values: list[str | None]) -> str:
            path = op.path
            for name, v in path_values.items():
                path = path.replace("{" + name + "}", quote(_utf8(v), safe=""))
            given = [(n, _utf8(v)) for (n, _), v in zip(query, query_values) if v is not None]
            return f"{path}?{urlencode(given)}" if given else path

        return st.builds(
            build, st.fixed_dictionaries(parts), st.tuples(*(s for _, s in query)).map(list)
        )

    def headers(self) -> st.SearchStrategy[dict[str, str]]:
        odd = st.fixed_dictionaries(
            {"content-type": st.sampled_from(ODD_CONTENT_TYPES)},
            optional={
                "x-request-id": st.text(max_size=200).map(_latin1),
                "authorization": st.text(max_size=40).map(_latin1),
            },
        )
        usual = st.fixed_dictionaries({"content-type": st.sampled_from(CONTENT_TYPES)})
        return st.one_of(usual, usual, usual, odd)

    def odd_call(self) -> st.SearchStrategy[HttpCall]:
        """A method a path does not take, or a path that does not exist."""
        known = sorted({o.path.replace("{model}", self.model) for o in self.ops})
        return st.builds(
            HttpCall,
            st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
            st.one_of(
                st.sampled_from(known),
                st.text(max_size=30).map(lambda t: "/" + quote(_utf8(t))),
            ),
            st.one_of(st.none(), st.binary(max_size=32)),
        )


def _utf8(text: str) -> str:
    """``text`` with anything UTF-8 cannot carry (lone surrogates) replaced."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _latin1(text: str) -> str:
    """A header value http clients can send (latin-1, no line breaks, no whitespace around)."""
    return "".join(c for c in text if " " <= c <= "\xff" and c != "\x7f").strip(" \t")
