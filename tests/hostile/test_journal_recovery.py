"""Hostile journal contents at start-up: recovery replays only whole records of
our own segments, reads a bounded amount, and writes only below the Maildir root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailappliance import journal as journal_module
from mailappliance.journal import HEADER, Journal
from mailappliance.journal_files import Target, encode_body

SEGMENT = 256 * 1024


def crashed_journal(tmp_path: Path, bodies: list[bytes]) -> Path:
    """A journal holding ``bodies`` as records, left as a crash leaves it (no checkpoint)."""
    journal = Journal(tmp_path / "journal", tmp_path / "mail", segment_size=SEGMENT, use_syncfs=False)
    journal.open()
    journal.append(bodies)
    journal.abandon()
    return tmp_path / "journal"


def recover(tmp_path: Path) -> journal_module.RecoveryReport:
    journal = Journal(tmp_path / "journal", tmp_path / "mail", segment_size=SEGMENT, use_syncfs=False)
    report = journal.open()
    journal.close()
    return report


def body_for(maildir: Path, name: str, text: bytes) -> bytes:
    return encode_body(text, [Target(maildir, f"{name},S={len(text)}")])


def test_a_torn_or_corrupt_last_record_is_ignored_and_the_rest_replayed(tmp_path: Path) -> None:
    """A record failing its CRC (a torn append: never acknowledged) is not replayed; earlier ones are."""
    box = tmp_path / "mail" / "alice"
    crashed_journal(tmp_path, [body_for(box, "1.A.h", b"one\r\n"), body_for(box, "2.B.h", b"two\r\n")])
    segment = tmp_path / "journal" / "segment.000001"
    data = bytearray(segment.read_bytes())
    first = HEADER.size + len(body_for(box, "1.A.h", b"one\r\n"))
    data[first + HEADER.size + 10] ^= 0xFF  # inside the second record's body
    segment.write_bytes(bytes(data))
    report = recover(tmp_path)
    assert (report.records, report.written) == (1, 1)
    assert sorted(p.name for p in (box / "new").iterdir()) == ["1.A.h,S=5"]


def test_a_record_length_past_the_segment_is_not_read(tmp_path: Path) -> None:
    """A header claiming a 4 GiB body ends the segment's records: no huge read, nothing replayed."""
    crashed_journal(tmp_path, [body_for(tmp_path / "mail" / "alice", "1.A.h", b"one\r\n")])
    segment = tmp_path / "journal" / "segment.000001"
    data = bytearray(segment.read_bytes())
    data[4:8] = (0xFFFFFFFF).to_bytes(4, "little")
    segment.write_bytes(bytes(data))
    assert recover(tmp_path).records == 0
    assert not (tmp_path / "mail" / "alice").exists()


def test_targets_outside_the_maildir_root_are_refused(tmp_path: Path) -> None:
    """Records naming a directory outside the root ('..', another tree, a symlink out of it) write nothing there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "sneaky").symlink_to(outside, target_is_directory=True)
    bodies = [
        body_for(tmp_path / "mail" / ".." / "outside", "1.A.h", b"x\r\n"),
        body_for(outside, "2.B.h", b"x\r\n"),
        body_for(tmp_path / "mail" / "sneaky", "3.C.h", b"x\r\n"),
        body_for(tmp_path / "mail", "4.D.h", b"x\r\n"),  # the root itself is no Maildir
        encode_body(b"x\r\n", [Target(tmp_path / "mail" / "alice", "../../../outside/5.E.h,S=3")]),
        encode_body(b"x\r\n", [Target(tmp_path / "mail" / "alice", "6.F.h,S=999")]),  # size that lies
        encode_body(b"x\r\n", [Target(tmp_path / "mail" / "alice", "8.H.h,S=3\n")]),  # a control character
        body_for(tmp_path / "mail" / "bob", "7.G.h", b"fine\r\n"),
    ]
    crashed_journal(tmp_path, bodies)
    report = recover(tmp_path)
    assert (report.records, report.refused, report.written) == (8, 7, 1)
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "mail" / "new").exists() and not (tmp_path / "mail" / "alice").exists()
    assert [p.name for p in (tmp_path / "mail" / "bob" / "new").iterdir()] == ["7.G.h,S=6"]


def test_a_segment_that_is_a_symlink_is_removed_unread(tmp_path: Path) -> None:
    """segment.N as a symbolic link (to records elsewhere) is removed, not replayed; its target is untouched."""
    elsewhere = tmp_path / "elsewhere"
    crashed_journal(elsewhere, [body_for(tmp_path / "mail" / "alice", "1.A.h", b"one\r\n")])
    (tmp_path / "journal").mkdir()
    (tmp_path / "journal" / "segment.000007").symlink_to(elsewhere / "journal" / "segment.000001")
    before = (elsewhere / "journal" / "segment.000001").read_bytes()
    assert recover(tmp_path).records == 0
    assert not (tmp_path / "journal" / "segment.000007").is_symlink()
    assert (elsewhere / "journal" / "segment.000001").read_bytes() == before
    assert not (tmp_path / "mail" / "alice").exists()


def test_a_huge_segment_is_read_only_up_to_a_segments_size_and_reset(tmp_path: Path) -> None:
    """A (sparse) 4 GiB segment is read only as far as a segment goes, then reset to a segment's size."""
    crashed_journal(tmp_path, [body_for(tmp_path / "mail" / "alice", "1.A.h", b"one\r\n")])
    segment = tmp_path / "journal" / "segment.000001"
    os.truncate(segment, 4 * 1024**3)
    assert recover(tmp_path).records == 1
    assert segment.stat().st_size == SEGMENT


def test_odd_files_in_the_journal_directory_do_not_block_or_count(tmp_path: Path) -> None:
    """A FIFO or directory named like a segment, and files with other names, are left alone; start-up goes on."""
    (tmp_path / "journal").mkdir()
    os.mkfifo(tmp_path / "journal" / "segment.000003")
    (tmp_path / "journal" / "segment.000004").mkdir()
    (tmp_path / "journal" / "notes.txt").write_text("hello")
    assert recover(tmp_path).records == 0


def test_a_damaged_checkpoint_file_stops_the_start(tmp_path: Path) -> None:
    """A checkpoint file that fails its CRC stops the start (replaying everything could bring deleted mail back)."""
    crashed_journal(tmp_path, [body_for(tmp_path / "mail" / "alice", "1.A.h", b"one\r\n")])
    (tmp_path / "journal" / "checkpoint").write_bytes(b"\x01" * 12)
    with pytest.raises(OSError, match="damaged"):
        recover(tmp_path)


def test_a_second_process_on_the_same_journal_is_refused(tmp_path: Path) -> None:
    """A second journal on the same directory (another daemon on the same spool) is refused at open."""
    first = Journal(tmp_path / "journal", tmp_path / "mail", segment_size=SEGMENT, use_syncfs=False)
    first.open()
    try:
        with pytest.raises(OSError, match="in use by another process"):
            Journal(tmp_path / "journal", tmp_path / "mail", segment_size=SEGMENT, use_syncfs=False).open()
    finally:
        first.close()


def test_a_malformed_record_with_a_valid_crc_is_skipped(tmp_path: Path) -> None:
    """A record whose CRC matches but whose body is not ours (counts that overrun it) is skipped, the next replayed."""
    box = tmp_path / "mail" / "alice"
    crashed_journal(tmp_path, [b"\xff\xff\x00\x00\x00\x01", body_for(box, "2.B.h", b"two\r\n")])
    report = recover(tmp_path)
    assert (report.records, report.refused, report.written) == (2, 1, 1)
    assert [p.name for p in (box / "new").iterdir()] == ["2.B.h,S=5"]
