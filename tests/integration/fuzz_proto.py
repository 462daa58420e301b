"""Hypothesis strategies for raw protobuf request bytes, driven by message descriptors.

Requests are built on the wire, not through the protobuf API, so they can carry what no
well-behaved client can send: integers past their field's width, negative counts, unknown enum
values, invalid UTF-8 in string fields, huge fields, unknown field numbers, truncated and
corrupted bytes. Four shapes, mixed by ``requests``:

- tame: every field in a range the service accepts (``hints`` narrow named fields further:
  token ids inside the vocabulary, tiny ``max_new_tokens``), so calls reach deep code;
- one wild field: a tame message with one field (at any depth) overwritten by a wild value,
  which names the culprit when it breaks something;
- wild: every field wild;
- bytes: a tame message truncated / corrupted / extended, or random bytes.

Encoding rules are protobuf's: varints (10 bytes for negatives), zigzag for sint*, little-endian
fixed widths, length-delimited strings / bytes / messages / packed repeated scalars. Appending a
field to an encoded message overrides a scalar, extends a repeated field, merges a message.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

VARINT, I64, LEN, I32 = 0, 1, 2, 5
U64 = (1 << 64) - 1
# edges where width, sign and overflow bugs live
INT_EDGES = (
    0, 1, -1, 2, 127, 128, 255, 256, 65535, 65536,
    2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**32 - 1, 2**32, 2**32 + 1,
    2**53 + 1, 2**63 - 1, 2**63, -(2**63), 2**64 - 1,
)  # fmt: skip
FLOAT_EDGES = (
    0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-45, 1e-300, 1e38, 3.5e38, 1e308,
    float("inf"), float("-inf"), float("nan"),
)  # fmt: skip
HUGE_BYTES = (1 << 16, 1 << 18)  # far under the 64 MiB message limit; tokenized in < 1 s
MAX_DEPTH = 4

_INTS = {
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_ENUM, FieldDescriptor.TYPE_BOOL,
}  # fmt: skip
_ZIGZAG = {FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64}
_FIXED32 = {FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32}
_FIXED64 = {FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


# -- the wire ----------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    """``n`` as a varint, two's complement in 64 bits for negatives (as int32/int64 are)."""
    n &= U64
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def zigzag(n: int) -> int:
    n = max(-(2**63), min(n, 2**63 - 1))
    return ((n << 1) ^ (n >> 63)) & U64


def key(number: int, wire: int) -> bytes:
    return varint((number << 3) | wire)


def length_delimited(number: int, payload: bytes) -> bytes:
    return key(number, LEN) + varint(len(payload)) + payload


def scalar(fd: FieldDescriptor, value: Any) -> tuple[int, bytes]:
    """(wire type, encoded value) of one scalar of ``fd``'s type; ``value`` may be out of the
    type's range (ints wrap at 64 bits, floats are packed as given)."""
    t = fd.type
    if t in _INTS:
        return VARINT, varint(int(value))
    if t in _ZIGZAG:
        return VARINT, varint(zigzag(int(value)))
    if t == FieldDescriptor.TYPE_FLOAT:
        return I32, struct.pack("<f", _as_float32(value))
    if t == FieldDescriptor.TYPE_DOUBLE:
        return I64, struct.pack("<d", float(value))
    if t in _FIXED32:
        return I32, struct.pack("<I", int(value) & 0xFFFFFFFF)
    if t in _FIXED64:
        return I64, struct.pack("<Q", int(value) & U64)
    if t in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE):
        raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else bytes(value)
        return LEN, varint(len(raw)) + raw
    raise TypeError(f"no encoding for field type {t} ({fd.full_name})")


def _as_float32(value: float) -> float:
    try:
        struct.pack("<f", value)
        return float(value)
    except OverflowError:  # past float32's range: what a C cast gives
        return float("inf") if value > 0 else float("-inf")


def encode_field(fd: FieldDescriptor, values: list[Any], packed: bool = False) -> bytes:
    """Every value of ``fd`` (one for a singular field); repeated scalars packed or not."""
    if packed and is_repeated(fd) and _is_scalar(fd) and values:
        return length_delimited(fd.number, b"".join(scalar(fd, v)[1] for v in values))
    out = bytearray()
    for v in values:
        wire, raw = scalar(fd, v)
        out += key(fd.number, wire) + raw
    return bytes(out)


def _is_scalar(fd: FieldDescriptor) -> bool:
    """Numbers and bools: the types a repeated field may pack."""
    return fd.type not in (
        FieldDescriptor.TYPE_STRING,
        FieldDescriptor.TYPE_BYTES,
        FieldDescriptor.TYPE_MESSAGE,
    )


def is_repeated(fd: FieldDescriptor) -> bool:
    # protobuf >= 5 spells it is_repeated; label is the older (deprecated) way
    flag = getattr(fd, "is_repeated", None)
    if isinstance(flag, bool):
        return flag
    return bool(fd.label == FieldDescriptor.LABEL_REPEATED)


# -- values --------------------------------------------------------------------------------------


def wild_int() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from(INT_EDGES), st.integers(-(2**63), 2**64 - 1), st.integers(-3, 300)
    )


def wild_float() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(allow_nan=True))


def wild_bytes() -> st.SearchStrategy[bytes]:
    """Random bytes (mostly invalid UTF-8), invalid sequences on purpose, now and then a huge
    blob."""
    invalid = st.sampled_from(
        [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"a\x00b"]
    )
    huge = st.tuples(st.sampled_from(HUGE_BYTES), st.sampled_from([b"a", b"\xe4\xb8\x96", b"\xff"]))
    return st.one_of(
        st.binary(max_size=64),
        st.binary(max_size=64),
        invalid,
        invalid,
        huge.map(lambda t: t[1] * (t[0] // len(t[1]))),
    )


def wild_text() -> st.SearchStrategy[str | bytes]:
    return st.one_of(st.text(max_size=64), wild_bytes())


def tame_text(max_size: int = 24) -> st.SearchStrategy[str]:
    return st.text(max_size=max_size)


def _tame_scalar(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = fd.type
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in fd.enum_type.values])
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, *_FIXED32, *_FIXED64):
        return st.integers(0, 1000)
    if t in _INTS or t in _ZIGZAG:
        return st.integers(-2, 1000)
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(-2.0, 2.0, allow_nan=False, width=32)
    if t == FieldDescriptor.TYPE_STRING:
        return tame_text()
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=16)
    raise TypeError(f"no tame values for field type {t} ({fd.full_name})")


def _wild_scalar(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = fd.type
    if t in _INTS or t in _ZIGZAG or t in _FIXED32 or t in _FIXED64:
        return wild_int()
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return wild_float()
    if t in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        return wild_text()
    raise TypeError(f"no wild values for field type {t} ({fd.full_name})")


# -- messages ------------------------------------------------------------------------------------

# what a hint gives: one value (singular field) or a list of values (repeated field)
Hint = st.SearchStrategy[Any]


@dataclass(frozen=True)
class MessageFuzz:
    """Request bytes for one message type.

    ``tame_hints`` / ``wild_hints`` map a field's full name (``pdmesh.v1.SamplingParams.
    max_new_tokens``) to the strategy for its value(s) (a list for a repeated field, encoded
    bytes for a message field); a tame hint of None leaves the field out of tame messages.
    ``required``: full names of fields a tame message always sets.
    """

    descriptor: Descriptor
    tame_hints: Mapping[str, Hint | None] = field(default_factory=dict)
    wild_hints: Mapping[str, Hint] = field(default_factory=dict)
    required: frozenset[str] = frozenset()

    def tame(self) -> st.SearchStrategy[bytes]:
        return self._tame(self.descriptor, 0)

    def wild(self) -> st.SearchStrategy[bytes]:
        return self._wild(self.descriptor, 0)

    def one_wild_field(self) -> st.SearchStrategy[bytes]:
        """A tame message with one field, at any depth, set to a wild value."""
        return st.tuples(self.tame(), self._wild_path(self.descriptor, 0)).map(
            lambda parts: parts[0] + parts[1]
        )

    def mutated(self) -> st.SearchStrategy[bytes]:
        return mutated(self.tame())

    def requests(self) -> st.SearchStrategy[bytes]:
        """The mix the fuzz tests send: one-wild-field and tame messages (they get past the
        first check), wild, corrupted and random ones."""
        return st.one_of(
            self.tame(),
            self.one_wild_field(),
            self.one_wild_field(),
            self.wild(),
            self.mutated(),
            st.binary(max_size=128),
        )

    # -- internals

    def _tame(self, desc: Descriptor, depth: int) -> st.SearchStrategy[bytes]:
        # required fields first on the wire (any order is valid protobuf): a truncated copy
        # then loses the prompt, not the max_new_tokens that keeps a generation short
        ordered = sorted(desc.fields, key=lambda fd: fd.full_name not in self.required)
        parts = [self._tame_field(fd, depth) for fd in ordered]
        return st.tuples(*parts).map(b"".join) if parts else st.just(b"")

    def _tame_field(self, fd: FieldDescriptor, depth: int) -> st.SearchStrategy[bytes]:
        if fd.full_name in self.tame_hints and self.tame_hints[fd.full_name] is None:
            return st.just(b"")  # a field the service refuses outright (multimodal inputs...)
        hint = self.tame_hints.get(fd.full_name)
        if hint is not None:
            values = hint if is_repeated(fd) else hint.map(lambda v: [v])
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= MAX_DEPTH:
                return st.just(b"")
            one = self._tame(fd.message_type, depth + 1)
            values = st.lists(one, max_size=2) if is_repeated(fd) else one.map(lambda v: [v])
        else:
            one = _tame_scalar(fd)
            values = st.lists(one, max_size=3) if is_repeated(fd) else one.map(lambda v: [v])
        encoded = st.tuples(values, st.booleans()).map(lambda t: encode_field(fd, *t))
        if fd.full_name in self.required:
            return encoded
        return st.one_of(st.just(b""), encoded)

    def _wild(self, desc: Descriptor, depth: int) -> st.SearchStrategy[bytes]:
        parts = [st.one_of(st.just(b""), self._wild_field(fd, depth)) for fd in desc.fields]
        extra = st.lists(_unknown_field(), max_size=2).map(b"".join)
        return st.tuples(*parts, extra).map(b"".join)

    def _wild_values(self, fd: FieldDescriptor, depth: int) -> st.SearchStrategy[list[Any]]:
        hint = self.wild_hints.get(fd.full_name)
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= MAX_DEPTH:
                one: st.SearchStrategy[Any] = st.binary(max_size=8)
            else:
                one = st.one_of(self._wild(fd.message_type, depth + 1), st.binary(max_size=32))
        else:
            one = hint if hint is not None and not is_repeated(fd) else _wild_scalar(fd)
        if is_repeated(fd):
            if hint is not None:
                return hint
            # many elements now and then: long id lists, thousands of stop strings
            zero: Any = 0 if _is_scalar(fd) else b""
            many = st.sampled_from([1000, 20000]).map(lambda n: [zero] * n)
            return st.one_of(st.lists(one, max_size=6), many)
        return one.map(lambda v: [v])

    def _wild_field(self, fd: FieldDescriptor, depth: int) -> st.SearchStrategy[bytes]:
        values = self._wild_values(fd, depth)
        return st.tuples(values, st.booleans()).map(lambda t: encode_field(fd, *t))

    def _wild_path(self, desc: Descriptor, depth: int) -> st.SearchStrategy[bytes]:
        """One field set wild: this message's own, or one inside a message field."""
        if not desc.fields:
            return _unknown_field()

        def pick(fd: FieldDescriptor) -> st.SearchStrategy[bytes]:
            if fd.type == FieldDescriptor.TYPE_MESSAGE and depth < MAX_DEPTH:
                inner = self._wild_path(fd.message_type, depth + 1)
                nested = inner.map(lambda raw: length_delimited(fd.number, raw))
                return st.one_of(nested, self._wild_field(fd, depth))
            return self._wild_field(fd, depth)

        return st.sampled_from(list(desc.fields)).flatmap(pick)


def _unknown_field() -> st.SearchStrategy[bytes]:
    """A field number the message does not define, with any wire type."""
    number = st.one_of(st.integers(20, 200), st.just(536870911))  # 2^29 - 1: the largest
    value = st.one_of(
        wild_int().map(lambda n: (VARINT, varint(n))),
        st.binary(min_size=8, max_size=8).map(lambda b: (I64, b)),
        st.binary(max_size=16).map(lambda b: (LEN, varint(len(b)) + b)),
        st.binary(min_size=4, max_size=4).map(lambda b: (I32, b)),
    )
    return st.tuples(number, value).map(lambda t: key(t[0], t[1][0]) + t[1][1])


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """A message from ``base`` truncated, with bytes flipped / inserted / deleted, doubled or
    extended: 1 to 3 of these in a row."""
    raw = draw(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(("truncate", "flip", "insert", "delete", "double", "append")))
        at = draw(st.integers(0, len(raw)))
        if op == "truncate":
            raw = raw[: min(at, max(len(raw) - 1, 0))]
        elif op == "flip":
            i = min(at, len(raw) - 1)
            raw = (
                raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1 :]
                if raw
                else b"\xff"
            )
        elif op == "insert":
            raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
        elif op == "delete":
            raw = raw[:at] + raw[at + draw(st.integers(1, 4)) :]
        elif op == "double":
            raw = raw + raw
        else:
            raw = raw + draw(st.binary(min_size=1, max_size=16))
    return raw


# -- addresses ---------------------------------------------------------------------------------

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "[::1]", "localhost")
SAFE_ADDRESS = "127.0.0.1:9"  # discard: nothing listens there


def is_safe_address(value: str) -> bool:
    """Whether a service given ``value`` as a peer address could reach only this machine: no
    port at all (refused before any connection) or a loopback host."""
    if ":" not in value:
        return True
    host = value.split("://", 1)[-1].rpartition(":")[0]
    return host in LOOPBACK_HOSTS or (host.startswith("127.") and host.count(".") == 3)


def keep_local(message_class: Any, raw: bytes) -> bytes:
    """``raw`` with every string field named like an address or host that could reach past
    this machine set to ``SAFE_ADDRESS`` (fuzzers must send traffic to loopback only). Bytes
    that do not parse go as they are: the service cannot read an address from them either."""
    try:
        message = message_class.FromString(raw)
    except Exception:
        return raw
    return message.SerializeToString() if _localize(message) else raw


def _localize(message: Any) -> bool:
    changed = False
    for fd, value in message.ListFields():
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            for sub in value if is_repeated(fd) else [value]:
                if not isinstance(sub, (str, bytes, int, float)):  # map<string, scalar> entries
                    changed |= _localize(sub)
        elif fd.type == FieldDescriptor.TYPE_STRING and ("address" in fd.name or "host" in fd.name):
            if is_repeated(fd):
                fixed = [v if is_safe_address(v) else SAFE_ADDRESS for v in value]
                if fixed != list(value):
                    del value[:]
                    value.extend(fixed)
                    changed = True
            elif not is_safe_address(value):
                setattr(message, fd.name, SAFE_ADDRESS)
                changed = True
    return changed
