"""Filing into a Maildir++ folder that exists: the target of a sub-addressed recipient.

``alice+lists@example.net`` is filed into ``<alice's Maildir>/.lists/new`` if
that folder exists (made by the subscriber's IMAP client, or by the admin),
and into the inbox otherwise: a tag never creates a folder.  The folder is
looked up when the message is committed (in the commit thread, where disk
access belongs), exactly first, then without regard to case (remote servers
may change the case of a local part); a symbolic link is not followed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import attrs


@attrs.frozen
class FolderTarget:
    """``mailbox``'s Maildir++ folder ``folder`` (".lists") if it exists, else ``mailbox``."""

    mailbox: Path
    folder: str

    def path(self) -> Path:
        """Where to put the message now (blocking: a stat or two, a directory scan)."""
        exact = self.mailbox / self.folder
        if _is_folder(exact):
            return exact
        wanted = self.folder.lower()
        try:
            with os.scandir(self.mailbox) as entries:
                names = sorted(e.name for e in entries if e.name.lower() == wanted)
        except OSError:
            return self.mailbox
        for name in names:
            if _is_folder(self.mailbox / name):
                return self.mailbox / name
        return self.mailbox


def _is_folder(path: Path) -> bool:
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        return stat.S_ISDIR(os.lstat(path / "new").st_mode)
    except OSError:
        return False


def delivery_target(mailbox: Path, folder: str = "") -> Path | FolderTarget:
    """The commit target of one local recipient."""
    return FolderTarget(mailbox, folder) if folder else mailbox


def filing_path(target: Path | FolderTarget) -> Path:
    """The Maildir a commit target stands for now (in the commit thread)."""
    return target.path() if isinstance(target, FolderTarget) else target
