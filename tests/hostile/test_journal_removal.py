"""Removing the journal of a worker number the configuration no longer has: never one a live
process holds, never anything outside the spool through a symbolic link."""

from __future__ import annotations

import os
from pathlib import Path

from mailappliance.journal import Journal, journal_directory, recover_journals, remove_journal_directory

SEGMENT = 256 * 1024


def test_a_journal_another_process_holds_is_not_removed(tmp_path: Path) -> None:
    """journal.2 locked by a live journal (another daemon on this spool): left whole, and that journal works on."""
    live = Journal(journal_directory(tmp_path / "spool", 2), tmp_path / "mail", segment_size=SEGMENT,
                   use_syncfs=False)
    live.open()
    try:
        assert not remove_journal_directory(live.directory)
        assert (live.directory / "lock").exists() and not live.directory.with_name("journal.2.removing").exists()
        assert (live.directory / "segment.000001").exists()
        live.append([b"x"])  # still its own segments
    finally:
        live.abandon()


def test_a_leftover_removing_directory_that_is_a_symbolic_link_is_not_followed(tmp_path: Path) -> None:
    """<spool>/journal.2.removing -> a directory elsewhere: the link and what it points at stay."""
    spool, elsewhere = tmp_path / "spool", tmp_path / "precious"
    spool.mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (spool / "journal.2.removing").symlink_to(elsewhere)
    recover_journals(spool, tmp_path / "mail", keep=1)
    assert (elsewhere / "keep.txt").read_text() == "keep"


def test_links_inside_a_removed_journal_are_removed_not_followed(tmp_path: Path) -> None:
    """Symbolic links inside an unused journal (to a file, to a directory) go; their targets stay."""
    spool, elsewhere = tmp_path / "spool", tmp_path / "precious"
    (spool / "journal.3").mkdir(parents=True)
    (elsewhere / "inner").mkdir(parents=True)
    (elsewhere / "inner" / "keep.txt").write_text("keep")
    (spool / "journal.3" / "to-dir").symlink_to(elsewhere)
    (spool / "journal.3" / "to-file").symlink_to(elsewhere / "inner" / "keep.txt")
    (spool / "journal.3" / "sub").mkdir()
    (spool / "journal.3" / "sub" / "deep").symlink_to(elsewhere / "inner")
    recover_journals(spool, tmp_path / "mail", keep=1)
    assert not (spool / "journal.3").exists() and not (spool / "journal.3.removing").exists()
    assert (elsewhere / "inner" / "keep.txt").read_text() == "keep"


def test_a_journal_name_that_is_a_symbolic_link_is_neither_replayed_nor_removed(tmp_path: Path) -> None:
    """<spool>/journal.5 -> a directory elsewhere: not replayed, not renamed, its target untouched."""
    spool, elsewhere = tmp_path / "spool", tmp_path / "precious"
    spool.mkdir()
    elsewhere.mkdir()
    (elsewhere / "segment.000001").write_bytes(b"not ours")
    os.symlink(elsewhere, spool / "journal.5")
    assert recover_journals(spool, tmp_path / "mail", keep=1).records == 0
    assert (spool / "journal.5").is_symlink()
    assert (elsewhere / "segment.000001").read_bytes() == b"not ours"
