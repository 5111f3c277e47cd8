"""Event validation and dead-letter encoding."""

from __future__ import annotations

import json

import pytest

from streams.events import DeadLetter, MalformedEvent, PinEvent, Reason, guess_pin_id, parse_event


def test_roundtrip():
    ev = PinEvent.upsert("p-1", "https://x.example/a.jpg", 3, "cap", {"board": "b"}, 123.5)
    assert parse_event(ev.to_bytes()) == ev


@pytest.mark.parametrize("raw, needle", [
    (b"", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1]", "JSON object"),
    (json.dumps({"op": "move", "pin_id": "a", "version": 1, "event_time": 1}).encode(), "op"),
    (json.dumps({"op": "upsert", "pin_id": "a", "version": 1, "event_time": 1}).encode(), "image"),
    (json.dumps({"op": "delete", "pin_id": "a b", "version": 1, "event_time": 1}).encode(),
     "pin_id"),
    (json.dumps({"op": "delete", "pin_id": "a", "version": "1", "event_time": 1}).encode(),
     "version"),
    (json.dumps({"op": "delete", "pin_id": "a", "version": -1, "event_time": 1}).encode(),
     "version"),
    (json.dumps({"op": "delete", "pin_id": "a", "version": True, "event_time": 1}).encode(),
     "version"),
    (json.dumps({"op": "delete", "pin_id": "a", "version": 1}).encode(), "event_time"),
    (json.dumps({"op": "delete", "pin_id": "a", "version": 1, "event_time": 1,
                 "extra": 1}).encode(), "extra"),
    (json.dumps({"op": "upsert", "pin_id": "a", "version": 1, "event_time": 1,
                 "image": "x" * 5000}).encode(), "image"),
    (b"{" + b" " * 70000 + b"}", "limit"),
])
def test_malformed(raw, needle):
    with pytest.raises(MalformedEvent, match=needle):
        parse_event(raw)


def test_guess_pin_id_prefers_key():
    assert guess_pin_id(b"junk", b"k1") == "k1"
    assert guess_pin_id(b'{"pin_id": "p9"}') == "p9"
    assert guess_pin_id(b"junk") is None


def test_dead_letter_keeps_binary_original():
    raw = b"\x00\xffbinary"
    dl = DeadLetter(reason=Reason.MALFORMED_EVENT, error="x",
                    original=DeadLetter.encode_original(raw))
    back = DeadLetter.model_validate_json(dl.model_dump_json())
    assert back.original_bytes() == raw and back.reason is Reason.MALFORMED_EVENT
