"""Event validation and dead-letter encoding."""

from __future__ import annotations

import json
import time

import pytest

from encoder.errors import PinfreshError
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


def test_dead_letter_of_a_huge_value_is_bounded_and_describes_the_whole():
    import hashlib

    from streams.events import MAX_ORIGINAL_BYTES

    for raw in (b'{"caption": "' + b"x" * 1_000_000 + b'"}', bytes(range(256)) * 3200):
        dl = DeadLetter.build(Reason.MALFORMED_EVENT, "e" * 10_000, raw, pin_id="p" * 500,
                              traceback="t" * 100_000)
        wire = dl.model_dump_json().encode()
        # base64 of the 64 KiB prefix plus bounded error/traceback: far under Kafka's 1 MB
        assert len(wire) < 4 * MAX_ORIGINAL_BYTES // 3 + 20_000
        assert dl.original_size == len(raw) and dl.original_truncated
        assert dl.original_sha256 == hashlib.sha256(raw).hexdigest()
        assert len(dl.error) <= 2000 and len(dl.pin_id or "") == 128
        assert not dl.replayable
        with pytest.raises(PinfreshError, match="cannot replay"):
            dl.original_bytes()


def test_dead_letter_of_a_valid_event_keeps_it_whole():
    ev = PinEvent.upsert("p1", "/a.png", 3, caption="c" * 4000)
    dl = DeadLetter.build(Reason.NOT_FOUND, "gone", ev.to_bytes(), pin_id="p1")
    assert dl.replayable and parse_event(dl.original_bytes()) == ev


@pytest.mark.parametrize("ahead, why", [(None, "milliseconds"), (86_400, "future")],
                         ids=["milliseconds", "future"])  # ids fixed: xdist compares them
def test_event_time_must_be_epoch_seconds(ahead, why):
    t = 1764100000250.0 if ahead is None else time.time() + ahead
    raw = json.dumps({"op": "delete", "pin_id": "p", "version": 1, "event_time": t}).encode()
    with pytest.raises(MalformedEvent, match=why):
        parse_event(raw)


def test_image_error_accepts_only_known_reasons():
    from encoder.errors import ImageError

    assert ImageError("decode_failed", "x").reason is Reason.DECODE_FAILED
    with pytest.raises(ValueError):
        ImageError("no_such_reason", "x")  # type: ignore[arg-type]
