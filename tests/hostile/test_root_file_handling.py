"""Issue 12, points 5, 6 and 10: `directory setup`, `backup` and `restore` run as root, on
files that the daemon's user (or whoever can write there) may have prepared.

- A Maildir is the daemon user's: a link in it to a root-only file must not make a
  root backup copy that file (a restore would then hand it to the subscriber), and a
  link planted where a restore writes must be replaced, never written through.
- A backup is data: a manifest naming a path outside the layout ('..', relative)
  restores nothing.
- A password file that setup uses must be root's own regular file: through a link
  it would chown /etc/shadow to the daemon's group; another user's file would let
  that user choose the admin password.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest

from mailappliance.backup import BackupError, make_backup
from mailappliance.restore import restore
from mailappliance.config import load_config
from mailappliance.directory_setup import SecretFile, SetupError, ensure_secret_file
from tests.daemon import Appliance

NOBODY = 65534


@pytest.fixture
def layout(appliance: Callable[..., Appliance], tmp_path: Path) -> Appliance:
    instance = appliance(start=False)
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    new = instance.maildir_root / "alice" / "new"
    new.mkdir(parents=True)
    (instance.maildir_root / "alice" / "cur").mkdir()
    (instance.maildir_root / "alice" / "tmp").mkdir()
    (new / "1.M1.host").write_bytes(b"Subject: real\r\n\r\nmail\r\n")
    return instance


def test_backup_copies_no_file_a_maildir_link_points_at(layout: Appliance, tmp_path: Path) -> None:
    """new/evil -> a root-only file, and a whole Maildir that is a link: neither is followed."""
    secret = tmp_path / "root-only"
    secret.write_text("root:$6$secret-hash")
    secret.chmod(0o600)
    os.symlink(secret, layout.maildir_root / "alice" / "new" / "2.M2.host")
    os.symlink(tmp_path, layout.maildir_root / "mallory")
    manifest = make_backup(load_config(layout.config_path), tmp_path / "backup", Path("/nonexistent"))
    stored = b"".join(p.read_bytes() for p in (tmp_path / "backup").rglob("*") if p.is_file())
    assert b"secret-hash" not in stored
    assert not any(f["path"].endswith("2.M2.host") or "/mallory" in f["path"] for f in manifest["files"])
    assert any("2.M2.host: a symbolic link" in note for note in manifest["skipped"])
    assert any(f["path"].endswith("1.M1.host") for f in manifest["files"])


def test_restore_replaces_a_planted_link_and_refuses_a_linked_directory(layout: Appliance, tmp_path: Path) -> None:
    """--force over a layout where the daemon's user planted links: a file link is
    replaced by the message (its target untouched); a Maildir that became a link
    stops the restore before anything is written through it."""
    make_backup(load_config(layout.config_path), tmp_path / "backup", Path("/nonexistent"))
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    message = layout.maildir_root / "alice" / "new" / "1.M1.host"
    message.unlink()
    os.symlink(victim, message)
    restore(tmp_path / "backup", force=True)
    assert victim.read_text() == "untouched"
    assert not message.is_symlink() and message.read_bytes().startswith(b"Subject: real")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    alice = layout.maildir_root / "alice"
    os.rename(alice, tmp_path / "old-alice")
    os.symlink(elsewhere, alice)
    with pytest.raises(BackupError, match="is a symbolic link: refusing to restore through it"):
        restore(tmp_path / "backup", force=True)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("path", ["/etc/../root/.ssh/authorized_keys", "relative/file", "/"])
def test_a_manifest_with_a_path_outside_the_layout_restores_nothing(
        layout: Appliance, tmp_path: Path, path: str) -> None:
    """Paths in a manifest must be absolute and normal: '..', relative or '/' are refused."""
    backup = tmp_path / "backup"
    make_backup(load_config(layout.config_path), backup, Path("/nonexistent"))
    manifest = json.loads((backup / "manifest.json").read_text())
    manifest["files"][0]["path"] = path
    (backup / "manifest.json").write_text(json.dumps(manifest))
    os.rename(layout.root, tmp_path / "moved")
    with pytest.raises(BackupError, match="refusing the path"):
        restore(backup, force=True)
    assert not layout.root.exists()


def test_setup_refuses_a_password_file_that_is_a_link_or_not_roots(tmp_path: Path) -> None:
    """A link (here to a root-only file) is neither read nor chowned; a file another user
    wrote is not trusted as the admin password."""
    target = tmp_path / "shadow"
    target.write_text("root:$6$hash")
    target.chmod(0o600)
    link = tmp_path / "ldap-admin-password"
    os.symlink(target, link)
    with pytest.raises(SetupError, match="symbolic link"):
        ensure_secret_file(SecretFile("directory.ldap.admin_bind_password_file", link, 0o600, 0))
    assert (target.stat().st_gid, target.stat().st_mode & 0o777) == (0, 0o600)

    planted = tmp_path / "ldap-password"
    planted.write_text("chosen-by-mallory")
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(SetupError, match="belongs to uid 65534, not root"):
        ensure_secret_file(SecretFile("directory.ldap.bind_password_file", planted, 0o640, NOBODY))
