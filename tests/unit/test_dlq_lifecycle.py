"""Dead-letter lifecycle: copies of one event are one letter; marks close, failures reopen."""

from __future__ import annotations

from streams.dlq import letter_key, open_letters
from streams.events import DeadLetter, PinEvent, Reason


def _letter(pin: str, at: float, image: str = "/x.png") -> DeadLetter:
    raw = PinEvent.upsert(pin, image, 1, event_time=1.0).to_bytes()  # one event, its bytes
    return DeadLetter.build(Reason.NOT_FOUND, "gone", raw, pin_id=pin).model_copy(
        update={"failed_at": at})


def test_copies_are_one_open_letter_and_a_newer_failure_reopens_a_closed_one():
    a1, a2, b = _letter("a", 10.0), _letter("a", 20.0), _letter("b", 15.0)
    assert letter_key(a1) == letter_key(a2) != letter_key(b)
    got = open_letters([a1, b, a2], {})
    assert [(o.letter.pin_id, o.copies, o.letter.failed_at) for o in got] == [
        ("b", 1, 15.0), ("a", 2, 20.0)]
    # closed at 25: both closed; a copy written at 30 (it failed again) reopens "a" only
    marks = {letter_key(a1): ("replayed", 25.0), letter_key(b): ("resolved", 25.0)}
    assert open_letters([a1, b, a2], marks) == []
    reopened = open_letters([a1, b, a2, _letter("a", 30.0)], marks)
    assert [(o.letter.pin_id, o.copies) for o in reopened] == [("a", 3)]
    # another event of the same pin is another letter
    assert len(open_letters([a1, _letter("a", 11.0, image="/y.png")], {})) == 2


def test_letters_of_different_pins_with_the_same_original_stay_apart():
    """Empty originals (tombstones) of two pins share a sha256: closing one must not
    close the other."""
    a = DeadLetter.build(Reason.MALFORMED_EVENT, "empty", b"", pin_id="a")
    b = DeadLetter.build(Reason.MALFORMED_EVENT, "empty", b"", pin_id="b")
    assert letter_key(a) != letter_key(b)
    assert [o.letter.pin_id for o in open_letters([a, b], {letter_key(a): ("resolved", 1e12)})
            ] == ["b"]
