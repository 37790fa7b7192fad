"""A forwarding loop (ours with a remote forwarder, or two remote ones through us) ends at
the hop limit: more than 50 Received fields in a message header are refused 554 5.4.6,
whatever the chunking; Received lines in the body do not count."""

from __future__ import annotations

from mailappliance.smtp.data import MAX_HOPS, DataReader

HOP = b"Received: from mx.loop.example by mx.test.example; Tue, 1 Dec 2026 10:00:00 +0000\r\n"


def read(message: bytes, chunk: int) -> DataReader:
    reader = DataReader(lambda data: None, 10_000_000, 998)
    data = message + b".\r\n"
    for start in range(0, len(data), chunk):
        if reader.feed(data[start:start + chunk]) is not None:
            break
    return reader


def test_more_hops_than_the_limit_is_a_loop() -> None:
    """51 Received fields are a loop; 50 are not, however the bytes arrive."""
    for chunk in (1, 7, 100, 1_000_000):
        looped = read(HOP * (MAX_HOPS + 1) + b"Subject: x\r\n\r\nbody\r\n", chunk)
        assert looped.problems.too_many_hops, chunk
        fine = read(HOP * MAX_HOPS + b"Subject: x\r\n\r\nbody\r\n", chunk)
        assert not fine.problems.too_many_hops and fine.problems.hops == MAX_HOPS, chunk


def test_received_lines_in_the_body_do_not_count() -> None:
    """Only the header counts: a body quoting a hundred Received lines is no loop."""
    reader = read(b"Subject: x\r\n\r\n" + HOP * 100, 64)
    assert reader.problems.hops == 0 and not reader.problems.too_many_hops


def test_the_smtp_session_refuses_a_looping_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The session answers 554 5.4.6 at the final dot and stores nothing."""
    from tests.test_smtp_protocol import Harness

    h = Harness(tmp_path)
    h.send(b"EHLO mx.loop.example\r\n")
    assert h.codes(b"MAIL FROM:<eve@loop.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n") == [250, 250, 354]
    lines = h.send(HOP * (MAX_HOPS + 1) + b"\r\nbody\r\n.\r\n")
    assert lines == ["554 5.4.6 Error: too many hops (a mail loop?)"]
    assert h.messages("alice") == []
