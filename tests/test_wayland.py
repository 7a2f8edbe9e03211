"""guestdrv.wayland without a compositor: the wire format, the conversation, hostile input.

The compositor's side is played by encoding its events with the same encoder (a
message is a message, whichever way it travels); what the owner sends is decoded
back and checked request by request.
"""

from __future__ import annotations

import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestdrv.errors import (
    ClipboardError,
    ClipboardUnsupported,
    CompositorError,
    WaylandProtocolError,
)
from guestdrv.wayland import (
    DEVICE_ID,
    MANAGER_ID,
    MAX_MESSAGE_SIZE,
    MAX_PENDING_FDS,
    REGISTRY_ID,
    SEAT_ID,
    SELECTION_SYNC_ID,
    SERVER_ID_START,
    SOURCE_ID,
    TEXT_OFFERS,
    Arguments,
    Cancelled,
    Message,
    Ready,
    SelectionOwner,
    SendRequested,
    State,
    encode_message,
    encode_string,
    offers_for,
    split_message,
)
from protocol.clipformat import PNG_MIME, TEXT_MIME, ClipItem

WLR = "zwlr_data_control_manager_v1"
EXT = "ext_data_control_manager_v1"


# The wire format --------------------------------------------------------------------
def test_strings_carry_their_nul_and_pad_to_a_word() -> None:
    assert encode_string("abc") == struct.pack("=I", 4) + b"abc\0"
    assert encode_string("abcd") == struct.pack("=I", 5) + b"abcd\0\0\0\0"
    assert encode_string("\u2014") == struct.pack("=I", 4) + "\u2014".encode() + b"\0"
    with pytest.raises(ValueError, match="cannot be a Wayland string"):
        encode_string("a\0b")


def test_a_message_header_is_the_object_then_size_and_opcode_in_host_order() -> None:
    raw = encode_message(7, 3, 42, "x")
    assert len(raw) == 8 + 4 + 8
    object_id, word = struct.unpack_from("=II", raw)
    assert (object_id, word >> 16, word & 0xFFFF) == (7, 20, 3)
    assert raw[8:12] == struct.pack("=I", 42)
    assert sys.byteorder == "little" and raw[:4] == b"\x07\0\0\0"
    with pytest.raises(ValueError):
        encode_message(1, 0, "x" * MAX_MESSAGE_SIZE)


def test_split_waits_for_a_whole_message_then_returns_it() -> None:
    raw = encode_message(5, 1, 9)
    for cut in range(len(raw)):
        assert split_message(raw[:cut]) is None
    assert split_message(raw + b"more") == (Message(5, 1, struct.pack("=I", 9)), len(raw))


@pytest.mark.parametrize("size", [0, 4, 7, 10, MAX_MESSAGE_SIZE + 4, 0xFFFC])
def test_split_refuses_a_size_no_message_can_have(size: int) -> None:
    with pytest.raises(WaylandProtocolError, match=f"a message of {size} bytes"):
        split_message(struct.pack("=II", 2, size << 16))


def arguments(body: bytes, fds: list[int] | None = None) -> Arguments:
    queue = list(fds or [])
    return Arguments(Message(9, 0, body), "test#0", lambda: queue.pop(0) if queue else None)


def test_arguments_read_in_order_and_must_be_used_up() -> None:
    args = arguments(struct.pack("=I", 3) + encode_string("wl_seat") + struct.pack("=I", 8), [11])
    assert (args.uint(), args.string(), args.uint(), args.fd()) == (3, "wl_seat", 8, 11)
    args.end()


@pytest.mark.parametrize(("body", "reads", "why"), [
    (b"", "u", "before an argument"),
    (b"\1\0", "u", "before an argument"),
    (struct.pack("=I", 0), "s", "a null string"),
    (struct.pack("=I", 9) + b"abc\0", "s", "runs past the end"),
    (struct.pack("=I", 0xFFFFFFFF) + b"abc\0", "s", "runs past the end"),
    (struct.pack("=I", 4) + b"abcd", "s", "not terminated"),
    (struct.pack("=I", 4) + b"a\0b\0", "s", "not terminated"),
    (struct.pack("=I", 4) + b"\xff\xfe\xfd\0", "s", "not UTF-8"),
    (b"", "h", "did not come with it"),
    (struct.pack("=II", 1, 2), "ue", "4 bytes after the last argument"),
])
def test_malformed_arguments_are_a_protocol_error(body: bytes, reads: str, why: str) -> None:
    args = arguments(body)
    readers = {"u": args.uint, "s": args.string, "h": args.fd, "e": args.end}
    with pytest.raises(WaylandProtocolError, match=f"malformed test#0 event: .*{why}"):
        for read in reads:
            readers[read]()


# The conversation -----------------------------------------------------------------
def event(object_id: int, opcode: int, *args: int | str) -> bytes:
    return encode_message(object_id, opcode, *args)


def global_(name: int, interface: str, version: int = 1) -> bytes:
    return event(REGISTRY_ID, 0, name, interface, version)


def done(callback: int) -> bytes:
    return event(callback, 0, 1234)


def requests(raw: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while raw:
        found = split_message(raw)
        assert found is not None, "a partial request"
        message, size = found
        out.append((message.object_id, message.opcode, message.body))
        raw = raw[size:]
    return out


def drain(owner: SelectionOwner) -> list[object]:
    events = []
    while (ev := owner.next_event()) is not None:
        events.append(ev)
    return events


def feed(owner: SelectionOwner, data: bytes, fds: list[int] | None = None) -> list[object]:
    owner.receive_data(data, fds or [])
    return drain(owner)


def u(*values: int) -> bytes:
    return struct.pack(f"={len(values)}I", *values)


def discovered(owner: SelectionOwner, *globals_: bytes) -> list[tuple[int, int, bytes]]:
    """Play the compositor's answer to the first sync; the owner's requests in answer."""
    owner.data_to_send()
    assert feed(owner, b"".join(globals_) + done(3)) == []
    return requests(owner.data_to_send())


def serving(offers: list[str], manager: str = WLR) -> SelectionOwner:
    owner = SelectionOwner(offers)
    discovered(owner, global_(1, "wl_seat", 7), global_(2, manager, 2))
    assert feed(owner, done(SELECTION_SYNC_ID)) == [Ready(manager)]
    return owner


def test_the_first_requests_ask_for_the_registry_and_a_round_trip() -> None:
    owner = SelectionOwner(["text/plain"])
    assert requests(owner.data_to_send()) == [(1, 1, u(REGISTRY_ID)), (1, 0, u(3))]
    assert owner.data_to_send() == b""
    assert owner.state is State.DISCOVERING


def test_after_discovery_it_binds_offers_and_sets_the_selection_in_order() -> None:
    owner = SelectionOwner(["text/plain;charset=utf-8", PNG_MIME])
    sent = discovered(owner, global_(1, "wl_compositor", 5), global_(7, "wl_seat", 8),
                      global_(9, "wl_seat", 8), global_(12, WLR, 2))
    assert sent == [
        (REGISTRY_ID, 0, u(7) + encode_string("wl_seat") + u(1, SEAT_ID)),  # the first seat
        (REGISTRY_ID, 0, u(12) + encode_string(WLR) + u(1, MANAGER_ID)),
        (MANAGER_ID, 1, u(DEVICE_ID, SEAT_ID)),  # get_data_device
        (MANAGER_ID, 0, u(SOURCE_ID)),  # create_data_source
        (SOURCE_ID, 0, encode_string("text/plain;charset=utf-8")),
        (SOURCE_ID, 0, encode_string(PNG_MIME)),
        (DEVICE_ID, 0, u(SOURCE_ID)),  # set_selection
        (1, 0, u(SELECTION_SYNC_ID)),  # sync: done means it was processed
    ]
    assert owner.state is State.SETTING
    assert feed(owner, done(SELECTION_SYNC_ID)) == [Ready(WLR)]
    assert owner.state is State.SERVING


@pytest.mark.parametrize("order", [(EXT, WLR), (WLR, EXT)])
def test_the_standard_ext_protocol_is_preferred(order: tuple[str, str]) -> None:
    owner = SelectionOwner(["text/plain"])
    sent = discovered(owner, global_(1, "wl_seat"), global_(2, order[0]), global_(3, order[1]))
    assert sent[1] == (REGISTRY_ID, 0, u(2 if order[0] == EXT else 3) + encode_string(EXT) + u(1, MANAGER_ID))
    assert feed(owner, done(SELECTION_SYNC_ID)) == [Ready(EXT)]
    # ext's source has the same opcodes: a send arrives the same way.
    assert feed(owner, event(SOURCE_ID, 0, "text/plain"), [5]) == [SendRequested("text/plain", 5)]


def test_send_requests_carry_their_descriptor_in_order_then_cancelled_ends() -> None:
    owner = serving(["text/plain", PNG_MIME])
    got = feed(owner, event(SOURCE_ID, 0, PNG_MIME) + event(SOURCE_ID, 0, "text/plain"), [20, 21])
    assert got == [SendRequested(PNG_MIME, 20), SendRequested("text/plain", 21)]
    assert feed(owner, event(SOURCE_ID, 1)) == [Cancelled()]
    assert owner.state is State.CANCELLED
    assert feed(owner, event(SOURCE_ID, 1)) == []  # once is enough
    assert owner.close() == []


def test_a_request_before_the_round_trip_is_served_too() -> None:
    owner = SelectionOwner(["text/plain"])
    discovered(owner, global_(1, "wl_seat"), global_(2, WLR))
    assert feed(owner, event(SOURCE_ID, 0, "text/plain") + done(SELECTION_SYNC_ID), [4]) == [
        SendRequested("text/plain", 4), Ready(WLR)]


def test_offers_the_device_announces_are_destroyed_at_once() -> None:
    owner = serving(["text/plain"])
    offer = SERVER_ID_START + 3
    got = feed(owner, event(DEVICE_ID, 0, offer) + event(offer, 0, "text/plain")
               + event(DEVICE_ID, 1, offer) + event(DEVICE_ID, 1, 0))
    assert got == []
    assert requests(owner.data_to_send()) == [(offer, 1, b"")]


def test_a_data_offer_with_one_of_our_ids_is_refused() -> None:
    owner = serving(["text/plain"])
    with pytest.raises(WaylandProtocolError, match="not the compositor's"):
        feed(owner, event(DEVICE_ID, 0, 99))


def test_byte_by_byte_input_gives_the_same_events() -> None:
    owner = SelectionOwner(["a/b"])
    owner.data_to_send()
    stream = global_(1, "wl_seat") + global_(2, WLR) + done(3) + done(SELECTION_SYNC_ID)
    stream += event(SOURCE_ID, 0, "a/b") + event(SOURCE_ID, 1)
    got: list[object] = []
    for i in range(len(stream)):
        got += feed(owner, stream[i : i + 1], [8] if i == 0 else [])
    assert got == [Ready(WLR), SendRequested("a/b", 8), Cancelled()]


def test_events_of_unknown_objects_and_opcodes_are_ignored() -> None:
    owner = serving(["text/plain"])
    noise = (event(SEAT_ID, 0, 3) + event(SEAT_ID, 1, "seat0")  # capabilities, name
             + event(REGISTRY_ID, 1, 1)  # global_remove
             + event(REGISTRY_ID, 77, 1, 2, 3) + event(1, 1, 3)  # an unknown opcode, delete_id
             + event(4321, 0, "x") + event(SERVER_ID_START + 9, 5)  # objects we do not hold
             + global_(30, "wl_seat"))  # a seat plugged in later
    assert feed(owner, noise) == []
    assert owner.state is State.SERVING
    assert owner.data_to_send() == b""


def test_a_compositor_without_data_control_is_unsupported_for_good() -> None:
    owner = SelectionOwner(["text/plain"])
    owner.data_to_send()
    owner.receive_data(global_(1, "wl_seat") + global_(2, "wl_data_device_manager", 3) + done(3))
    with pytest.raises(ClipboardUnsupported, match=r"no data-control protocol .*Mutter"):
        owner.next_event()
    assert owner.state is State.ERROR
    with pytest.raises(ClipboardUnsupported):
        owner.next_event()
    assert owner.data_to_send() == b""


def test_a_compositor_without_a_seat_is_a_clear_error() -> None:
    owner = SelectionOwner(["text/plain"])
    owner.receive_data(global_(2, WLR) + done(3))
    with pytest.raises(ClipboardError, match="no seat"):
        owner.next_event()


def test_the_compositors_error_event_names_object_code_and_text() -> None:
    owner = serving(["text/plain"])
    with pytest.raises(CompositorError) as raised:
        feed(owner, event(1, 0, SOURCE_ID, 1, "offer after set_selection\x1b[31m\n"))
    exc = raised.value
    assert (exc.object_id, exc.interface, exc.code) == (SOURCE_ID, "zwlr_data_control_source_v1", 1)
    assert exc.message == "offer after set_selection\\x1b[31m\\n"
    assert str(exc).startswith("the compositor reported error 1 on zwlr_data_control_source_v1 (object 7)")


def test_the_device_finishing_ends_the_service() -> None:
    owner = serving(["text/plain"])
    with pytest.raises(ClipboardError, match="ended our data device"):
        feed(owner, event(DEVICE_ID, 2))


def test_a_global_of_version_zero_is_refused() -> None:
    owner = SelectionOwner(["text/plain"])
    with pytest.raises(WaylandProtocolError, match="version 0"):
        feed(owner, global_(1, "wl_seat", 0))


def test_a_send_without_its_descriptor_is_refused() -> None:
    owner = serving(["text/plain"])
    with pytest.raises(WaylandProtocolError, match="descriptor did not come"):
        feed(owner, event(SOURCE_ID, 0, "text/plain"))


def test_a_malformed_send_hands_its_descriptor_back_to_be_closed() -> None:
    owner = serving(["text/plain"])
    with pytest.raises(WaylandProtocolError, match="after the last argument"):
        feed(owner, event(SOURCE_ID, 0, "text/plain", 5), [13, 14])
    assert owner.close() == [13, 14]


def test_descriptors_no_event_claims_are_bounded_and_handed_back() -> None:
    owner = serving(["text/plain"])
    owner.receive_data(b"", list(range(100, 100 + MAX_PENDING_FDS)))
    with pytest.raises(WaylandProtocolError, match="no event claims"):
        owner.receive_data(b"", [999])
    assert owner.close() == [*range(100, 100 + MAX_PENDING_FDS), 999]


def test_offers_are_checked_when_the_owner_is_made() -> None:
    for bad in ([], ["a/b", "a/b"], ["a\0b"], [f"t/{i}" for i in range(65)]):
        with pytest.raises(ValueError):
            SelectionOwner(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 8))
def test_arbitrary_bytes_from_the_compositor_raise_only_clipboard_errors(data: bytes, fds: int) -> None:
    owner = serving(["text/plain", PNG_MIME])
    try:
        feed(owner, data, list(range(50, 50 + fds)))
    except ClipboardError:
        assert owner.state is State.ERROR


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, REGISTRY_ID, DEVICE_ID, SOURCE_ID, SEAT_ID, 3, 8]),
                          st.integers(0, 4), st.binary(max_size=40).map(lambda b: b + bytes(-len(b) % 4))),
                max_size=12))
def test_well_framed_nonsense_raises_only_clipboard_errors(messages: list[tuple[int, int, bytes]]) -> None:
    owner = SelectionOwner(["text/plain"])
    stream = b"".join(struct.pack("=II", obj, (8 + len(body)) << 16 | op) + body
                      for obj, op, body in messages)
    try:
        feed(owner, stream, [70, 71])
    except ClipboardError:
        assert owner.state is State.ERROR


# What is offered --------------------------------------------------------------------
def test_text_is_offered_under_every_text_name_and_other_items_under_their_type() -> None:
    text, image, html = ClipItem(TEXT_MIME, b"t"), ClipItem(PNG_MIME, b"p"), ClipItem("text/html", b"<b>")
    offers = offers_for([text, image, html])
    assert list(offers) == [*TEXT_OFFERS, PNG_MIME, "text/html"]
    assert all(offers[name] is text for name in TEXT_OFFERS)
    assert offers[PNG_MIME] is image and offers["text/html"] is html


def test_an_item_claiming_a_text_name_does_not_take_it_from_the_text() -> None:
    text, plain = ClipItem(TEXT_MIME, b"utf-8"), ClipItem("text/plain", b"other")
    assert offers_for([text, plain])["text/plain"] is text
    assert offers_for([plain, text])["text/plain"] is plain  # the sender preferred it
