"""Issue 11, finding 12 (storage modes): the spool and the generated TLS files are private.

``spool_dir`` and ``var/tls`` used to be created 0755 (the umask's default)
although the docs promise 0700; the key was 0600 but in a listable directory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable, Iterator

import pytest

from mailappliance.queue.spool import OutboundSpool
from mailappliance.tls import ensure_self_signed
from tests.daemon import Appliance


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Umask 0, so only the code's own modes count."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_daemon_creates_spool_and_tls_directories_0700(appliance: Callable[..., Appliance]) -> None:
    """A first start creates spool_dir, its queue and the self-signed certificate's directory 0700, the keys 0600."""
    instance = appliance()
    assert mode(instance.root / "spool") == 0o700
    assert mode(instance.root / "spool" / "queue") == 0o700
    assert mode(instance.root / "tls") == 0o700
    assert mode(instance.root / "tls" / "server.key") == 0o600
    assert mode(instance.root / "srs.key") == 0o600  # the SRS secret, next to the spool (issue 14)


def test_spool_prepare_makes_private_directories_with_missing_parents(
        tmp_path: Path, permissive_umask: None) -> None:
    """prepare() makes the spool directory itself 0700 even when it creates it as a parent of queue/."""
    spool_dir = tmp_path / "var" / "lib" / "spool"
    OutboundSpool(spool_dir).prepare()
    assert (mode(spool_dir), mode(spool_dir / "queue")) == (0o700, 0o700)
    assert mode(tmp_path / "var") == 0o777  # a parent above the spool: the umask's business


def test_spool_prepare_leaves_an_existing_spool_directory_alone(tmp_path: Path) -> None:
    """An admin's own spool directory keeps the mode the admin gave it."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o750)
    os.chmod(spool_dir, 0o750)
    OutboundSpool(spool_dir).prepare()
    assert (mode(spool_dir), mode(spool_dir / "queue")) == (0o750, 0o700)


def test_self_signed_files_are_private_whatever_the_umask(tmp_path: Path, permissive_umask: None) -> None:
    """The generated certificate's directory is 0700, the key 0600, the (public) certificate 0644."""
    tls_dir = tmp_path / "var" / "tls"
    assert ensure_self_signed(tls_dir / "server.pem", tls_dir / "server.key", "mx.example.org")
    assert mode(tls_dir) == 0o700
    assert mode(tls_dir / "server.key") == 0o600
    assert mode(tls_dir / "server.pem") == 0o644


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files to another user needs root")
def test_self_signed_files_go_to_the_daemon_user(tmp_path: Path) -> None:
    """Run as root with an owner, the directory and both files belong to that user (SIGHUP re-reads them)."""
    tls_dir = tmp_path / "tls"
    ensure_self_signed(tls_dir / "server.pem", tls_dir / "server.key", "mx.example.org", owner=(65534, 65534))
    for path in (tls_dir, tls_dir / "server.key", tls_dir / "server.pem"):
        assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534), path
