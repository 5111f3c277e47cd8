"""Property-based: random events and random bytes never escape the typed errors."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encoder.errors import ImageError
from encoder.model import PreprocessSpec
from encoder.preprocess import prepare_image
from streams.events import MalformedEvent, PinEvent, parse_event

SPEC = PreprocessSpec(image_size=32)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10),
                                                                       children, max_size=4),
    max_leaves=10,
)
event_like = st.fixed_dictionaries({}, optional={
    "op": st.sampled_from(["upsert", "delete", "UPSERT", "", "noop"]) | json_values,
    "pin_id": st.from_regex(r"[A-Za-z0-9._:-]{0,140}", fullmatch=True) | json_values,
    "version": st.integers(min_value=-5, max_value=2**63) | json_values,
    "image": st.text(max_size=50) | json_values,
    "caption": st.text(max_size=50) | json_values,
    "event_time": st.floats(allow_nan=True) | json_values,
    "metadata": json_values,
})


@given(st.binary(max_size=2048))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes_as_event(raw):
    try:
        ev = parse_event(raw)
    except MalformedEvent:
        return
    assert isinstance(ev, PinEvent)


@given(event_like)
@settings(max_examples=500)
def test_random_event_objects(obj):
    try:
        ev = parse_event(json.dumps(obj).encode())
    except MalformedEvent as exc:
        assert str(exc)
        return
    assert ev.op in ("upsert", "delete") and ev.version >= 0
    assert ev.op == "delete" or ev.image
    assert parse_event(ev.to_bytes()) == ev


@given(st.binary(max_size=4096))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes_as_image(data):
    try:
        out = prepare_image(data, SPEC, max_pixels=4_000_000)
    except ImageError as exc:
        assert exc.reason in {"not_an_image", "decode_failed", "too_many_pixels",
                              "image_too_small"}
        return
    assert out.shape == (32, 32, 3)


@given(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM"]),
       st.binary(max_size=2048))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes_behind_a_real_magic(magic, rest):
    try:
        out = prepare_image(magic + rest, SPEC, max_pixels=4_000_000)
    except ImageError as exc:  # the only error allowed, with a dead-letter reason
        assert exc.reason in {"not_an_image", "decode_failed", "too_many_pixels",
                              "image_too_small"} and str(exc)
        return
    assert out.shape == (32, 32, 3) and out.dtype.kind in "uf"
