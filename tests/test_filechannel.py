"""The file states of the sans-IO channels, driven through a null transport (lists)."""

from __future__ import annotations

import pytest

from protocol.channel import (
    CAP_FILES_FROM,
    CAP_FILES_TO,
    FILE_IDLE_TIMEOUT_S,
    OFFER_BURST,
    OFFER_INTERVAL_S,
    Dropped,
    FailReason,
    FileIncoming,
    FileIncomingCancelled,
    FileOffered,
    FileOutcome,
    FileSendApproved,
    FileSendEnded,
    FileStreamed,
    GuestChannel,
    HostChannel,
    HostState,
    OfferWithdrawn,
)
from protocol.errors import FileRefused, LocalProtocolError, RemoteProtocolError
from protocol.messages import (
    Cancel,
    CopyRequest,
    EntryType,
    FileBegin,
    FileChunk,
    FileCode,
    FileEnd,
    FileEntry,
    FileOffer,
    FileResult,
    FileStart,
    Message,
    StreamEnd,
)

OFFER = FileOffer(77, 2, 1, 3, 0, 1, (b"top",))
DIGEST = b"\0" * 32


def host() -> HostChannel:
    return HostChannel(chunk_size=1024, timeout_s=5.0)


def outputs(channel: HostChannel | GuestChannel, now: float = 0.0) -> list[Message]:
    sent = []
    while (message := channel.next_output()) is not None:
        sent.append(message)
        if isinstance(channel, HostChannel):
            channel.output_done(now)
        else:
            channel.output_done()
    return sent


def stream(tid: int) -> list[FileEntry | FileChunk | FileEnd | StreamEnd]:
    return [FileEntry(tid, EntryType.DIRECTORY, 0o755, 0, 0, b"top"),
            FileEntry(tid, EntryType.FILE, 0o644, 0, 3, b"top/f"), FileChunk(tid, 0, b"abc"),
            FileEnd(tid, DIGEST), StreamEnd(tid, 2, 3)]


# Host side: offers ------------------------------------------------------------------------
def test_an_offer_is_only_recorded_and_one_at_a_time() -> None:
    channel = host()
    assert channel.receive(OFFER, 1.0) == [FileOffered(OFFER)]
    assert channel.pending_offer == OFFER and channel.state is HostState.IDLE and channel.capabilities == 0
    second = FileOffer(78, 1, 1, 1, 0, 1, (b"other",))
    assert channel.receive(second, 2.0) == [Dropped(second)]
    assert channel.pending_offer == OFFER  # never changes under the user's eyes
    assert channel.receive(Cancel(77), 3.0) == [OfferWithdrawn(77)]
    assert channel.pending_offer is None


def test_offers_after_withdrawals_are_rate_limited_but_offers_after_gestures_are_not() -> None:
    channel = host()
    now = 10.0
    taken = 0
    for offer_id in range(100, 100 + OFFER_BURST + 5):  # a guest withdrawing and re-offering in a loop
        offer = FileOffer(offer_id, 1, 1, 1, 0, 1, (b"x",))
        events = channel.receive(offer, now)
        if events == [FileOffered(offer)]:
            taken += 1
            assert channel.receive(Cancel(offer_id), now) == [OfferWithdrawn(offer_id)]
            assert channel.offer_withdrawn_at == now
        else:
            assert events == [Dropped(offer)] and channel.pending_offer is None
    assert taken == 1 + OFFER_BURST  # the first offer followed no withdrawal
    late = FileOffer(200, 1, 1, 1, 0, 1, (b"y",))
    assert channel.receive(late, now + OFFER_INTERVAL_S) == [FileOffered(late)]  # one token back
    channel.reject_offer()  # the user's gesture: offers that follow are not limited
    for offer_id in range(300, 310):
        offer = FileOffer(offer_id, 1, 1, 1, 0, 1, (b"z",))
        assert channel.receive(offer, now + OFFER_INTERVAL_S) == [FileOffered(offer)]
        channel.reject_offer()


def test_a_pending_offer_does_not_block_the_clipboard() -> None:
    channel = host()
    channel.receive(OFFER, 0.0)
    channel.start_copy(5, 100, 0.0)
    assert outputs(channel) == [CopyRequest(5, 100)] and channel.pending_offer == OFFER


def test_reject_tells_the_guest_with_the_offer_id() -> None:
    channel = host()
    channel.receive(OFFER, 0.0)
    assert channel.reject_offer() == OFFER
    assert outputs(channel) == [Cancel(77)] and channel.pending_offer is None


def test_a_guest_may_not_start_or_begin_transfers() -> None:
    for message in (FileStart(1, 2), FileBegin(1, 1, 1, 1, 0, "bob"), CopyRequest(1, 1)):
        with pytest.raises(RemoteProtocolError, match="may not send"):
            host().receive(message, 0.0)


# Host side: the source ------------------------------------------------------------------
def test_approval_starts_the_source_and_the_relay_pulls_it() -> None:
    channel = host()
    with pytest.raises(LocalProtocolError, match="no file offer"):
        channel.start_file_source(9, 0.0)
    channel.receive(OFFER, 0.0)
    assert channel.wants_input()
    assert channel.start_file_source(9, 0.0) == OFFER
    assert outputs(channel) == [FileStart(9, 77)]
    assert channel.capabilities == CAP_FILES_FROM and not channel.wants_input()  # flow: the relay pulls
    for message in stream(9):
        channel.take_stream(message, 1.0)
    assert channel.stream_checker is not None and channel.stream_checker.bytes == 3


def test_the_source_is_held_to_what_was_approved() -> None:
    channel = host()
    channel.receive(OFFER, 0.0)
    channel.start_file_source(9, 0.0)
    channel.take_stream(FileEntry(9, EntryType.DIRECTORY, 0o755, 0, 0, b"top"), 0.0)
    channel.take_stream(FileEntry(9, EntryType.FILE, 0o644, 0, 3, b"top/a"), 0.0)
    channel.take_stream(FileChunk(9, 0, b"abc"), 0.0)
    channel.take_stream(FileEnd(9, DIGEST), 0.0)
    with pytest.raises(FileRefused, match="announced") as info:
        channel.take_stream(FileEntry(9, EntryType.FILE, 0o644, 0, 0, b"top/b"), 0.0)  # a second file
    assert isinstance(info.value, RemoteProtocolError)  # so the broker marks the VM faulty
    with pytest.raises(LocalProtocolError, match="another transfer"):
        channel.take_stream(FileEntry(8, EntryType.FILE, 0o644, 0, 0, b"c"), 0.0)


@pytest.mark.parametrize(("offer", "stream", "why"), [
    (FileOffer(77, 1, 1, 0, 0, 1, (b"holiday.jpg",)),
     [FileEntry(9, EntryType.FILE, 0o755, 0, 0, b"run-me.desktop")], "where the offer named 'holiday.jpg'"),
    (FileOffer(77, 2, 2, 0, 0, 1, (b"a",)),
     [FileEntry(9, EntryType.FILE, 0o644, 0, 0, b"a"), FileEnd(9, DIGEST),
      FileEntry(9, EntryType.FILE, 0o644, 0, 0, b"b")], "more top-level entries than the 1 offered"),
    (FileOffer(77, 2, 2, 0, 0, 2, (b"a", b"b")),
     [FileEntry(9, EntryType.FILE, 0o644, 0, 0, b"a"), FileEnd(9, DIGEST), StreamEnd(9, 1, 0)],
     "held 1 top-level entries, the offer 2"),
], ids=["another-name", "one-more", "one-fewer"])
def test_the_stream_holds_exactly_the_top_level_entries_offered(
        offer: FileOffer, stream: list[Message], why: str) -> None:
    channel = host()
    channel.receive(offer, 0.0)
    channel.start_file_source(9, 0.0)
    with pytest.raises(FileRefused, match=why):
        for message in stream:
            channel.take_stream(message, 0.0)  # type: ignore[arg-type]


def test_top_level_names_beyond_those_an_offer_could_show_are_counted_not_named() -> None:
    channel = host()
    offer = FileOffer(77, 3, 3, 0, 0, 3, (b"a",))  # 3 roots, only the first named (the list was full)
    channel.receive(offer, 0.0)
    channel.start_file_source(9, 0.0)
    for name in (b"a", b"x", b"y"):
        channel.take_stream(FileEntry(9, EntryType.FILE, 0o644, 0, 0, name), 0.0)
        channel.take_stream(FileEnd(9, DIGEST), 0.0)
    channel.take_stream(StreamEnd(9, 3, 0), 0.0)


def test_a_sender_reports_failure_but_never_success() -> None:
    channel = host()
    channel.receive(OFFER, 0.0)
    channel.start_file_source(9, 0.0)
    with pytest.raises(RemoteProtocolError, match="cannot declare"):
        channel.receive(FileResult(9, FileCode.OK), 0.0)
    failure = FileResult(9, FileCode.READ_ERROR, 13, 0, b"top/f")
    assert channel.receive(failure, 0.0) == [FileOutcome(9, failure)]
    assert channel.state is HostState.IDLE
    late = FileChunk(9, 0, b"late")
    assert channel.receive(late, 0.0) == [Dropped(late)]  # in flight: dropped, and no progress


def test_the_outcome_goes_back_after_a_queued_start() -> None:
    channel = host()
    channel.receive(OFFER, 0.0)
    channel.start_file_source(9, 0.0)
    channel.finish_file(FileResult(4, FileCode.EXISTS, 0, 0, b"top"))  # before FileStart went out
    assert outputs(channel) == [FileStart(9, 77), FileResult(9, FileCode.EXISTS, 0, 0, b"top")]


# Host side: the target -------------------------------------------------------------------
def test_the_target_confirms_only_what_it_was_given() -> None:
    channel = host()
    channel.start_file_target(4, entries=2, files=1, total_size=3, flags=0, source="alice", now=0.0)
    assert outputs(channel) == [FileBegin(4, 2, 1, 3, 0, "alice")]
    assert channel.capabilities == CAP_FILES_TO
    given = [channel.give_stream(m, 0.0) for m in stream(9)[:-1]]
    assert set(given) == {4}  # re-tagged with the target's own id
    with pytest.raises(RemoteProtocolError, match="not all been sent"):
        channel.receive(FileResult(4, FileCode.OK), 0.0)


def test_the_target_verdict_ends_the_transfer() -> None:
    channel = host()
    channel.start_file_target(4, entries=2, files=1, total_size=3, flags=0, source="alice", now=0.0)
    outputs(channel)
    for message in stream(9):
        channel.give_stream(message, 0.0)
    ok = FileResult(4, FileCode.OK, 0, 2)
    assert channel.receive(ok, 0.0) == [FileOutcome(4, ok)]
    assert channel.state is HostState.IDLE


def test_silence_times_a_file_transfer_out_and_cancels_it() -> None:
    channel = host()
    channel.start_file_target(4, entries=2, files=1, total_size=3, flags=0, source="alice", now=0.0)
    outputs(channel, now=0.0)
    assert channel.tick(FILE_IDLE_TIMEOUT_S - 1) == []  # no overall limit, only silence
    assert channel.tick(FILE_IDLE_TIMEOUT_S + 1) == [FileOutcome(4, None, FailReason.TIMEOUT)]
    assert outputs(channel) == [Cancel(4)]


def test_file_records_nobody_asked_for_are_dropped() -> None:
    channel = host()
    for message in stream(3):
        assert channel.receive(message, 0.0) == [Dropped(message)]
    assert channel.receive(FileResult(3, FileCode.OK), 0.0) == [Dropped(FileResult(3, FileCode.OK))]


# Guest side ------------------------------------------------------------------------------
def guest() -> GuestChannel:
    return GuestChannel(chunk_size=1024, limit=1 << 20)


def test_the_guest_streams_only_after_approval_of_its_own_offer() -> None:
    channel = guest()
    channel.announce(OFFER, 0.0)
    with pytest.raises(LocalProtocolError, match="already"):
        channel.announce(OFFER, 0.0)
    assert outputs(channel) == [OFFER]
    assert channel.receive(FileStart(9, 12345)) == [Dropped(FileStart(9, 12345))]
    with pytest.raises(LocalProtocolError, match="no approved"):
        channel.stream(lambda: None)
    assert channel.receive(FileStart(9, 77)) == [FileSendApproved(9)]
    pulled = iter(stream(9))
    channel.stream(lambda: next(pulled, None))
    assert outputs(channel) == stream(9)
    ok = FileResult(9, FileCode.OK)
    assert channel.receive(ok) == [FileSendEnded(9, ok)]


def test_the_guest_hears_a_rejection_and_withdraws_on_cancel() -> None:
    channel = guest()
    channel.announce(OFFER, 0.0)
    outputs(channel)
    [event] = channel.receive(Cancel(77))
    assert isinstance(event, FileSendEnded) and event.result.code == FileCode.REFUSED
    channel.announce(FileOffer(80, 1, 1, 1, 0, 1, (b"x",)), 0.0)
    channel.cancel_send(0.0)
    assert outputs(channel)[-1] == Cancel(80)


def test_the_guest_waits_after_a_withdrawal_before_offering_again() -> None:
    channel = guest()
    channel.announce(OFFER, 5.0)
    channel.cancel_send(5.0)
    again = FileOffer(81, 1, 1, 1, 0, 1, (b"x",))
    with pytest.raises(LocalProtocolError, match="withdrawn less than 1 s ago; send again"):
        channel.announce(again, 5.0 + OFFER_INTERVAL_S / 2)
    channel.announce(again, 5.0 + OFFER_INTERVAL_S)
    assert outputs(channel) == [OFFER, Cancel(77), again]


def test_the_guest_receives_only_the_stream_it_was_told_of() -> None:
    channel = guest()
    begin = FileBegin(4, 2, 1, 3, 0, "alice")
    assert channel.receive(begin) == [FileIncoming(begin)]
    other = FileEntry(5, EntryType.FILE, 0o644, 0, 0, b"x")
    assert channel.receive(other) == [Dropped(other)]
    first = stream(4)[0]
    assert channel.receive(first) == [FileStreamed(first)]
    assert channel.receive(Cancel(4)) == [FileIncomingCancelled(4)]


def test_a_clipboard_answer_never_drops_queued_file_records() -> None:
    channel = guest()
    channel.announce(OFFER, 0.0)
    channel.receive(CopyRequest(3, 100))
    channel.answer_copy(3, b"clip")
    sent = outputs(channel)
    assert sent[0] == OFFER and len(sent) == 4  # the offer, then DataBegin, chunk, DataEnd
