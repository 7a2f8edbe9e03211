"""guestdrv.x11owner: our CLIPBOARD selection owner, against xclip and a hand-driven requestor.

The requestor (python-xlib) speaks the ICCCM selection protocol step by step, so the
tests see what xclip hides: refusals, the property None of obsolete clients, MULTIPLE,
the INCR chunks, a requestor that stops reading or whose window goes away.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("Xlib", reason="python-xlib not installed (pip install -e '.[desktop]')")

from Xlib import X, Xatom
from Xlib.display import Display
from Xlib.protocol import event as xevent
from Xlib.protocol import rq

from broker.lab import XServer
from guestdrv.x11owner import MAX_TRANSFERS, Offer, _earlier, offers_for
from protocol import clipformat
from protocol.clipformat import PNG_MIME, TEXT_MIME, ClipItem

ROOT = Path(__file__).resolve().parent.parent
XclipOut = Callable[[str], bytes | None]
"""The conftest fixture xclip_out: what `xclip -o -t TARGET` gets (None: refused or no owner)."""

EMOJI_TEXT = "em dash \u2014 block \u2588 emoji \U0001f98a\r\nsecond line\r\n".encode()


# The targets, without an X server --------------------------------------------------
def test_ascii_text_gets_every_text_target_and_the_image_its_own() -> None:
    offers = offers_for([ClipItem(TEXT_MIME, b"plain\r\n"), ClipItem(PNG_MIME, b"\x89PNG")])
    assert offers == {
        "UTF8_STRING": Offer("UTF8_STRING", b"plain\r\n"),
        TEXT_MIME: Offer(TEXT_MIME, b"plain\r\n"),
        "TEXT": Offer("STRING", b"plain\r\n"),
        "STRING": Offer("STRING", b"plain\r\n"),
        "text/plain": Offer("text/plain", b"plain\r\n"),
        PNG_MIME: Offer(PNG_MIME, b"\x89PNG"),
    }


def test_latin1_text_is_served_as_latin1_under_string_and_not_as_text_plain() -> None:
    offers = offers_for([ClipItem(TEXT_MIME, "\u00fcn\u00efc\u00f8d\u00e9".encode())])
    latin1 = Offer("STRING", "\u00fcn\u00efc\u00f8d\u00e9".encode("latin-1"))
    assert offers["STRING"] == offers["TEXT"] == latin1
    assert offers["UTF8_STRING"].data == "\u00fcn\u00efc\u00f8d\u00e9".encode()
    assert "text/plain" not in offers


def test_text_beyond_latin1_or_not_utf8_is_never_offered_as_string() -> None:
    offers = offers_for([ClipItem(TEXT_MIME, EMOJI_TEXT)])
    assert list(offers) == ["UTF8_STRING", TEXT_MIME, "TEXT"]
    assert offers["TEXT"] == Offer("UTF8_STRING", EMOJI_TEXT)
    raw = b"caf\xe9 \xff"  # a permissive paste: bytes as they came
    offers = offers_for([ClipItem(TEXT_MIME, raw), ClipItem("text/html", b"<b>x</b>")])
    assert list(offers) == ["UTF8_STRING", TEXT_MIME, "TEXT", "text/html"]
    assert offers["UTF8_STRING"].data == offers["TEXT"].data == raw


@pytest.mark.parametrize(("stamp", "than", "earlier"), [
    (100, 200, True), (200, 100, False), (200, 200, False),
    (X.CurrentTime, 200, False),  # "now" is never too early
    (0xFFFFFF00, 0x10, True),  # the server clock wrapped between the two
    (0x10, 0xFFFFFF00, False),
])
def test_server_times_compare_across_the_wrap(stamp: int, than: int, earlier: bool) -> None:
    assert _earlier(stamp, than) is earlier


# Against an X server ---------------------------------------------------------------
class Owner:
    """guestdrv.x11owner serving `items`, its log in a file."""

    def __init__(self, xserver: XServer, items: list[ClipItem], log: Path, *args: str) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "guestdrv.x11owner", "--display", xserver.display,
                 "--log-level", "debug", *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=out, cwd=ROOT)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(clipformat.encode(items))
        self.proc.stdin.close()
        self.line = self.proc.stdout.readline()

    def log_text(self) -> str:
        return self.log.read_text()

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


@pytest.fixture
def serve(xserver: XServer, tmp_path: Path) -> Iterator[Callable[..., Owner]]:
    owners: list[Owner] = []

    def start(items: list[ClipItem], *args: str) -> Owner:
        owner = Owner(xserver, items, tmp_path / f"owner-{len(owners)}.log", *args)
        owners.append(owner)
        assert owner.line == b"owned\n", owner.log_text()
        return owner

    yield start
    for owner in owners:
        owner.close()


class Requestor:
    """An X client that asks for the clipboard one protocol step at a time."""

    def __init__(self, xserver: XServer) -> None:
        self.d = Display(xserver.display)
        self.win = self.d.screen().root.create_window(
            0, 0, 1, 1, 0, X.CopyFromParent, X.InputOnly, X.CopyFromParent,
            event_mask=X.PropertyChangeMask)
        self.clipboard = self.atom("CLIPBOARD")

    def atom(self, name: str) -> int:
        return self.d.intern_atom(name)

    def wait(self, match: Callable[[rq.Event], bool], timeout: float = 5.0) -> rq.Event | None:
        deadline = time.monotonic() + timeout
        while True:
            while self.d.pending_events():
                ev = self.d.next_event()
                if match(ev):
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            select.select([self.d.fileno()], [], [], left)

    def ask(self, target: str, prop: str | None = "IVCLIP_GOT", *, selection: str = "CLIPBOARD",
            stamp: int = X.CurrentTime) -> int:
        """ConvertSelection; the property the owner's SelectionNotify names (X.NONE: refused)."""
        self.win.convert_selection(self.atom(selection), self.atom(target),
                                   self.atom(prop) if prop else X.NONE, stamp)
        self.d.flush()
        ev = self.wait(lambda e: isinstance(e, xevent.SelectionNotify))
        assert ev is not None, f"no SelectionNotify for {target}"
        return int(ev.property)

    def take(self, prop: int) -> tuple[int, bytes | list[int]]:
        """Read and delete `prop`: its type and value."""
        reply = self.win.get_property(prop, X.AnyPropertyType, 0, 1 << 28, delete=True)
        assert reply is not None
        value = bytes(reply.value) if reply.format == 8 else [int(v) for v in reply.value]
        return int(reply.property_type), value

    def next_chunk(self, prop: int, timeout: float = 5.0) -> bool:
        """Wait until the owner writes the next INCR chunk into `prop`."""
        return self.wait(lambda e: isinstance(e, xevent.PropertyNotify) and e.atom == prop
                         and e.state == X.PropertyNewValue, timeout) is not None

    def read(self, target: str) -> tuple[str, bytes, int]:
        """The whole conversion: its type's name, its bytes and how many INCR chunks it took."""
        prop = self.ask(target)
        assert prop != X.NONE, f"{target} refused"
        kind, value = self.take(prop)
        if kind != self.atom("INCR"):
            assert isinstance(value, bytes)
            return self.d.get_atom_name(kind), value, 0
        data, chunks = bytearray(), 0
        while True:
            assert self.next_chunk(prop), f"the INCR transfer of {target} stalled after {chunks} chunks"
            kind, value = self.take(prop)
            assert isinstance(value, bytes)
            if not value:
                return self.d.get_atom_name(kind), bytes(data), chunks
            data += value
            chunks += 1

    def close(self) -> None:
        self.d.close()


@pytest.fixture
def requestor(xserver: XServer) -> Iterator[Requestor]:
    req = Requestor(xserver)
    yield req
    req.close()


def test_targets_timestamp_and_text_conversions(serve: Callable[..., Owner], requestor: Requestor) -> None:
    serve([ClipItem(TEXT_MIME, "\u00fcn\u00efc\u00f8d\u00e9\r\n".encode()), ClipItem(PNG_MIME, b"\x89PNG")])
    kind, targets = requestor.take(requestor.ask("TARGETS"))
    assert kind == Xatom.ATOM and isinstance(targets, list)
    assert [requestor.d.get_atom_name(a) for a in targets] == [
        "TARGETS", "TIMESTAMP", "MULTIPLE", "UTF8_STRING", TEXT_MIME, "TEXT", "STRING", PNG_MIME]
    assert requestor.read("UTF8_STRING") == ("UTF8_STRING", "\u00fcn\u00efc\u00f8d\u00e9\r\n".encode(), 0)
    latin1 = "\u00fcn\u00efc\u00f8d\u00e9\r\n".encode("latin-1")
    assert requestor.read("STRING") == requestor.read("TEXT") == ("STRING", latin1, 0)
    assert requestor.read(PNG_MIME) == (PNG_MIME, b"\x89PNG", 0)
    kind, stamp = requestor.take(requestor.ask("TIMESTAMP"))
    assert kind == Xatom.INTEGER and isinstance(stamp, list) and stamp[0] > 0


def test_refusals_leave_the_owner_serving(serve: Callable[..., Owner], requestor: Requestor) -> None:
    owner = serve([ClipItem(TEXT_MIME, EMOJI_TEXT)])
    _, stamp = requestor.take(requestor.ask("TIMESTAMP"))
    assert isinstance(stamp, list)
    assert requestor.ask("image/x-unknown") == X.NONE
    assert requestor.ask("STRING") == X.NONE  # beyond Latin-1: refused, not mojibake
    assert requestor.ask("text/plain") == X.NONE  # not ASCII
    assert requestor.ask("UTF8_STRING", selection="PRIMARY") == X.NONE  # not our selection
    assert requestor.ask("UTF8_STRING", stamp=stamp[0] - 1) == X.NONE  # asked before we owned it
    assert requestor.ask("MULTIPLE", prop=None) == X.NONE  # MULTIPLE needs its property
    assert requestor.read("UTF8_STRING") == ("UTF8_STRING", EMOJI_TEXT, 0)
    assert owner.proc.poll() is None


def test_an_obsolete_client_without_a_property_gets_the_target_as_property(
        serve: Callable[..., Owner], requestor: Requestor) -> None:
    serve([ClipItem(TEXT_MIME, b"old client")])
    prop = requestor.ask("UTF8_STRING", prop=None)
    assert prop == requestor.atom("UTF8_STRING")
    assert requestor.take(prop) == (requestor.atom("UTF8_STRING"), b"old client")


def test_multiple_converts_each_pair_and_marks_the_failed_ones(
        serve: Callable[..., Owner], requestor: Requestor) -> None:
    serve([ClipItem(TEXT_MIME, b"several"), ClipItem(PNG_MIME, b"\x89PNG")])
    a = requestor.atom
    pairs = [a("UTF8_STRING"), a("P1"), a("image/x-unknown"), a("P2"), a(PNG_MIME), a("P3")]
    requestor.win.change_property(a("IVCLIP_PAIRS"), a("ATOM_PAIR"), 32, pairs)
    prop = requestor.ask("MULTIPLE", "IVCLIP_PAIRS")
    assert prop == a("IVCLIP_PAIRS")
    assert requestor.take(prop) == (a("ATOM_PAIR"), [a("UTF8_STRING"), a("P1"), X.NONE, a("P2"),
                                                     a(PNG_MIME), a("P3")])
    assert requestor.take(a("P1")) == (a("UTF8_STRING"), b"several")
    assert requestor.take(a("P3")) == (a(PNG_MIME), b"\x89PNG")


def test_a_small_chunk_size_makes_many_incr_chunks(serve: Callable[..., Owner], requestor: Requestor,
                                                   xclip_out: XclipOut) -> None:
    data = os.urandom(50_000)
    # A long idle timeout: an owner that sleeps on a chunk it has not sent would stall the
    # reading for that long, past the requestor's patience, instead of a moment.
    serve([ClipItem(PNG_MIME, data)], "--chunk", "1000", "--incr-timeout", "60")
    assert requestor.read(PNG_MIME) == (PNG_MIME, data, 50)
    assert xclip_out(PNG_MIME) == data


def test_a_requestor_that_stops_reading_is_abandoned_while_others_are_served(
        serve: Callable[..., Owner], requestor: Requestor, xclip_out: XclipOut) -> None:
    data = os.urandom(20_000)
    owner = serve([ClipItem(PNG_MIME, data)], "--chunk", "1000", "--incr-timeout", "0.5")
    prop = requestor.ask(PNG_MIME)
    assert requestor.take(prop)[0] == requestor.atom("INCR")
    assert requestor.next_chunk(prop)  # the first chunk, which it never takes
    assert xclip_out(PNG_MIME) == data  # meanwhile another client gets it all
    time.sleep(1.0)
    assert "abandoned the transfer of image/png" in owner.log_text()
    requestor.take(prop)  # too late: the owner gave up, no chunk follows
    assert not requestor.next_chunk(prop, timeout=0.5)
    assert xclip_out(PNG_MIME) == data


def test_a_transfer_in_flight_when_the_clipboard_is_lost_is_finished_to_its_end(
        serve: Callable[..., Owner], requestor: Requestor, xserver: XServer) -> None:
    """ICCCM 2.3: the owner finishes the transfer, and its last, empty chunk reaches the
    requestor before the owner exits (a requestor without a timeout, as xclip is, would
    otherwise wait for it forever)."""
    data = os.urandom(20_000)
    owner = serve([ClipItem(PNG_MIME, data)], "--chunk", "1000", "--incr-timeout", "60")
    prop = requestor.ask(PNG_MIME)
    assert requestor.take(prop)[0] == requestor.atom("INCR")
    thief = Requestor(xserver)  # Ctrl-C in another application
    thief.win.set_selection_owner(thief.clipboard, X.CurrentTime)
    thief.d.sync()
    received = bytearray()
    while True:
        assert requestor.next_chunk(prop), f"the transfer stalled after {len(received)} bytes"
        chunk = requestor.take(prop)[1]
        assert isinstance(chunk, bytes)
        if not chunk:
            break
        received += chunk
    assert bytes(received) == data
    assert owner.proc.wait(10) == 0
    assert "stopped serving the clipboard: another client took the clipboard" in owner.log_text()
    thief.close()


def test_transfers_in_flight_are_bounded(serve: Callable[..., Owner], requestor: Requestor,
                                         xclip_out: XclipOut) -> None:
    data = os.urandom(5000)
    owner = serve([ClipItem(PNG_MIME, data)], "--chunk", "1000", "--incr-timeout", "0.5")
    answers = [requestor.ask(PNG_MIME, f"IVCLIP_P{i}") for i in range(MAX_TRANSFERS + 1)]
    assert X.NONE not in answers[:MAX_TRANSFERS]  # each began an INCR transfer it never reads
    assert answers[MAX_TRANSFERS] == X.NONE  # one more is refused, not queued
    assert "transfers in flight already" in owner.log_text()
    time.sleep(1.0)  # the stalled ones time out and make room
    assert xclip_out(PNG_MIME) == data


def test_a_requestor_window_destroyed_mid_transfer_ends_its_transfer(
        serve: Callable[..., Owner], xserver: XServer, xclip_out: XclipOut) -> None:
    data = os.urandom(20_000)
    owner = serve([ClipItem(PNG_MIME, data)], "--chunk", "1000")
    gone = Requestor(xserver)
    prop = gone.ask(PNG_MIME)
    gone.take(prop)  # the INCR header: the owner writes the first chunk and waits
    assert gone.next_chunk(prop)
    gone.close()  # its window goes with its connection
    deadline = time.monotonic() + 5
    while "abandoned" not in owner.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    # At once, not after the idle timeout ("no progress in 5 s").
    assert "after 1000 of 20000 bytes: its window was destroyed" in owner.log_text()
    assert xclip_out(PNG_MIME) == data
    assert owner.proc.poll() is None


def test_sigterm_gives_the_clipboard_up_and_exits_cleanly(serve: Callable[..., Owner],
                                                          xclip_out: XclipOut) -> None:
    owner = serve([ClipItem(TEXT_MIME, b"short-lived")])
    assert xclip_out("UTF8_STRING") == b"short-lived"
    assert owner.close() == 0
    assert xclip_out("TARGETS") is None
    assert "stopped serving the clipboard: told to stop" in owner.log_text()


def test_the_owner_leaves_when_its_driver_goes_away(serve: Callable[..., Owner],
                                                   xclip_out: XclipOut) -> None:
    owner = serve([ClipItem(TEXT_MIME, b"held by the owner")])
    assert xclip_out("UTF8_STRING") == b"held by the owner"
    assert owner.proc.stdout is not None
    owner.proc.stdout.close()  # what the kernel does when the driver dies
    assert owner.proc.wait(10) == 0
    assert xclip_out("TARGETS") is None
    assert "the driver went away" in owner.log_text()


def test_input_that_is_not_a_typed_clipboard_is_an_error_line(xserver: XServer) -> None:
    result = subprocess.run([sys.executable, "-m", "guestdrv.x11owner", "--display", xserver.display],
                            input=b"plain bytes", capture_output=True, cwd=ROOT, timeout=30)
    assert result.returncode == 1
    assert result.stdout.startswith(b"error: the paste is not a typed clipboard: ")
