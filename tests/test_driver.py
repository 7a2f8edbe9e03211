"""guestdrv.driver: the pure helpers of the guest driver (the flows run in the e2e tests)."""

from __future__ import annotations

from guestdrv.driver import matching_item
from protocol.clipformat import PNG_MIME, TEXT_MIME, ClipItem


def test_a_type_matches_exactly_first_then_without_its_parameters() -> None:
    text = ClipItem(TEXT_MIME, b"hello")
    latin = ClipItem("text/plain;charset=iso-8859-1", b"h\xe9")
    image = ClipItem(PNG_MIME, b"\x89PNG")
    items = [latin, text, image]
    assert matching_item(items, TEXT_MIME) is text
    assert matching_item(items, "text/plain") is latin  # the first text/plain of any charset
    assert matching_item([text, image], "TEXT/Plain") is text
    assert matching_item(items, "image/png") is image
    assert matching_item(items, "image/jpeg") is None
    assert matching_item([], "text/plain") is None
