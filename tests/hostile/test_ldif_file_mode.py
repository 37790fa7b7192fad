"""Issue 11, finding 12 (users.ldif): the LDIF directory was shipped 0644 and
rewritten keeping that mode, so every local user could read the password hashes.

Now every write makes the file 0600 (0640 if the admin had deliberately made
it group-readable only), keeping its owner and group; opening the store
tightens a file whose owner is not root; a root-owned file that others can
read is left alone (a daemon dropping to another user may read it through
those bits) but named in a note and in check-config.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

import pytest

from mailappliance.directory.ldif import LdifStore
from tests.daemon import Appliance

NOBODY, NOGROUP = 65534, 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def instance(appliance: Callable[..., Appliance]) -> Appliance:
    made = appliance(start=False)
    assert made.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    return made


def test_a_new_directory_file_is_0600(instance: Appliance) -> None:
    """The first `user add` creates users.ldif 0600, whatever the umask."""
    assert mode(instance.root / "users.ldif") == 0o600


@pytest.mark.parametrize("owner", [(0, 0), (NOBODY, NOGROUP)])
def test_a_rewrite_makes_a_world_readable_file_private_and_keeps_its_owner(instance: Appliance,
                                                                          owner: tuple[int, int]) -> None:
    """A 0644 file rewritten by the admin tool (as root) is 0600 afterwards, owner and group unchanged."""
    ldif = instance.root / "users.ldif"
    os.chown(ldif, *owner)
    ldif.chmod(0o644)
    changed = instance.admin("alias", "add", "alice", "a2@example.org")
    assert changed.returncode == 0, changed.stderr
    info = ldif.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o600, *owner)
    assert LdifStore(ldif).find_by_address("a2@example.org").uid == "alice"
    assert not [p.name for p in instance.root.iterdir() if p.name.endswith(".tmp")]


def test_a_deliberately_group_readable_file_stays_0640(instance: Appliance) -> None:
    """root:<daemon's group> 0640 is a valid setup: kept on rewrite, only noted by check-config."""
    ldif = instance.root / "users.ldif"
    os.chown(ldif, 0, NOGROUP)
    ldif.chmod(0o640)
    assert instance.admin("alias", "add", "alice", "a2@example.org").returncode == 0
    assert (mode(ldif), ldif.stat().st_gid) == (0o640, NOGROUP)
    checked = instance.admin("check-config")
    assert "warn ldif-mode" in checked.stdout and "by its group" in checked.stdout


def test_opening_tightens_a_file_owned_by_the_daemons_user(instance: Appliance) -> None:
    """A 0644 file owned by another user than root is made 0600 as soon as the tool opens it."""
    ldif = instance.root / "users.ldif"
    os.chown(ldif, NOBODY, NOGROUP)
    ldif.chmod(0o644)
    listed = instance.admin("user", "list")
    assert listed.returncode == 0 and "alice" in listed.stdout
    assert mode(ldif) == 0o600 and ldif.stat().st_uid == NOBODY
    assert "now 0600" in listed.stderr


def test_a_root_owned_readable_file_is_named_not_changed(instance: Appliance) -> None:
    """root:root 0644 (perhaps read by a daemon that drops to another user): a note and a check-config warning."""
    ldif = instance.root / "users.ldif"
    ldif.chmod(0o644)
    listed = instance.admin("user", "list")
    assert listed.returncode == 0 and mode(ldif) == 0o644
    assert "readable or writable by every user" in listed.stderr and f"chown mailappliance {ldif}" in listed.stderr
    checked = instance.admin("check-config")
    assert checked.returncode == 0 and "warn ldif-mode" in checked.stdout, checked.stdout


def test_the_daemon_tightens_its_directory_file_at_start(appliance: Callable[..., Appliance]) -> None:
    """A daemon started with a 0644 file that its user owns makes it 0600 and logs it."""
    made = appliance(start=False)
    assert made.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    ldif = made.root / "users.ldif"
    os.chown(ldif, NOBODY, NOGROUP)
    ldif.chmod(0o666)
    made.start()
    assert mode(ldif) == 0o600
    assert "directory file:" in made.log() and "now 0600" in made.log()


def test_an_owner_that_is_not_root_tightens_its_own_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The non-root owner (the daemon's user, a developer) makes its own file private."""
    from mailappliance.directory.ldif import tighten_file_mode

    ldif = tmp_path / "users.ldif"
    ldif.write_text("version: 1\n")
    os.chown(ldif, NOBODY, NOGROUP)
    ldif.chmod(0o660)
    monkeypatch.setattr(os, "geteuid", lambda: NOBODY)
    assert "now 0640" in (tighten_file_mode(ldif) or "")  # group-readable, nobody else: group write dropped
    ldif.chmod(0o604)
    assert "now 0600" in (tighten_file_mode(ldif) or "")
    assert tighten_file_mode(ldif) is None
