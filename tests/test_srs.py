"""SRS rewriting and reversal: pure functions, no sockets."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mailappliance.mailpath import parse_path
from mailappliance.srs import Srs, SrsError, SrsKeys, ensure_key, load_keys, looks_like_srs, read_key

NOW = 1_700_000_000.0
DAY = 86400.0
KEY = b"0123456789abcdef0123456789abcdef"
SRS = Srs(SrsKeys(KEY), "example.net")


def test_forward_then_reverse_returns_to_the_original_sender() -> None:
    """An SRS0 address in our domain reverses to the sender it was made from, within the age limit."""
    address = SRS.forward("Eve@Sender.example", NOW)
    assert address is not None and address.startswith("SRS0=") and address.endswith("@example.net")
    local = address.rpartition("@")[0]
    assert SRS.reverse(local, NOW) == "Eve@Sender.example"
    assert SRS.reverse(local, NOW + 21 * DAY) == "Eve@Sender.example"
    assert SRS.reverse(local.lower(), NOW) == "eve@sender.example"  # a remote server lower-cased it
    assert SRS.reverse(local.upper(), NOW) == "EVE@SENDER.EXAMPLE"


@pytest.mark.parametrize("change", ["hash", "timestamp", "domain", "local"])
def test_every_part_of_an_srs0_address_is_signed(change: str) -> None:
    """Changing the hash, the day, the domain or the user of an SRS0 address breaks it."""
    local = SRS.forward("eve@sender.example", NOW).rpartition("@")[0]  # type: ignore[union-attr]
    tag, signature, stamp, domain, user = local.split("=")
    forged = {"hash": f"{tag}={'A' * len(signature)}={stamp}={domain}={user}",
              "timestamp": f"{tag}={signature}={'AA' if stamp != 'AA' else 'AB'}={domain}={user}",
              "domain": f"{tag}={signature}={stamp}=victim.example={user}",
              "local": f"{tag}={signature}={stamp}={domain}=victim"}[change]
    with pytest.raises(SrsError):
        SRS.reverse(forged, NOW)


def test_expired_and_future_timestamps_are_refused() -> None:
    """An SRS0 address older than max_age_days (or dated in the future) no longer reverses."""
    local = SRS.forward("eve@sender.example", NOW).rpartition("@")[0]  # type: ignore[union-attr]
    with pytest.raises(SrsError, match="expired"):
        SRS.reverse(local, NOW + 22 * DAY)
    with pytest.raises(SrsError, match="expired"):
        SRS.reverse(local, NOW - 2 * DAY)
    assert SRS.reverse(local, NOW + 400 * DAY, check_age=False) == "eve@sender.example"


def test_another_installations_key_does_not_verify() -> None:
    """An SRS address made with another key is refused; an old key listed for rotation still works."""
    other = Srs(SrsKeys(b"another key of sixteen bytes or more"), "example.net")
    local = other.forward("eve@sender.example", NOW).rpartition("@")[0]  # type: ignore[union-attr]
    with pytest.raises(SrsError, match="hash"):
        SRS.reverse(local, NOW)
    rotated = Srs(SrsKeys(KEY, previous=(b"another key of sixteen bytes or more",)), "example.net")
    assert rotated.reverse(local, NOW) == "eve@sender.example"


def test_srs1_chain_points_back_to_the_first_forwarder() -> None:
    """Forwarding an SRS0 sender of another forwarder makes SRS1; its reversal is that SRS0 address."""
    first = Srs(SrsKeys(b"first forwarder's key, 32 bytes.."), "fwd1.example")
    srs0 = first.forward("eve@sender.example", NOW)
    assert srs0 is not None
    srs1 = SRS.forward(srs0, NOW)
    assert srs1 is not None and srs1.startswith("SRS1=") and "=fwd1.example==" in srs1
    assert SRS.reverse(srs1.rpartition("@")[0], NOW) == srs0
    assert first.reverse(srs0.rpartition("@")[0], NOW) == "eve@sender.example"
    third = Srs(SrsKeys(b"a third forwarder's key, 32 bytes"), "fwd3.example")
    again = third.forward(srs1, NOW)  # SRS1 of an SRS1 still points at the first forwarder
    assert again is not None and "=fwd1.example==" in again
    assert third.reverse(again.rpartition("@")[0], NOW) == srs0


@pytest.mark.parametrize("local", ["SRS1=AAAAAAAA=fwd1.example==HHH=TT=sender.example=eve",
                                   "SRS1=fwd1.example==HHH=TT=sender.example=eve", "SRS1=", "SRS0=", "SRS0=a=b=c",
                                   "srs0=x=y", "SRS1==fwd1.example==x"])
def test_forged_or_malformed_srs_is_refused(local: str) -> None:
    """Made-up SRS0/SRS1 addresses (no valid hash, missing parts) never reverse."""
    with pytest.raises(SrsError):
        SRS.reverse(local, NOW)


def test_forward_leaves_what_cannot_be_rewritten() -> None:
    """The null sender, a quoted local part and a too-long result are not rewritten."""
    assert SRS.forward("", NOW) is None
    assert SRS.forward('"john doe"@sender.example', NOW) is None
    assert SRS.forward("a" * 64 + "@" + ("b" * 60 + ".") * 3 + "example", NOW) is None


def test_rewritten_addresses_parse_as_smtp_paths() -> None:
    """Long SRS addresses (local part over 64 octets) are still valid paths for our parser."""
    address = SRS.forward("a.rather.long.local.part.of.sixty.characters.or.so@a-long-domain.example", NOW)
    assert address is not None and len(address.rpartition("@")[0]) > 64
    assert parse_path(f"<{address}>", allow_null=False).address == address
    assert looks_like_srs(address) and looks_like_srs("srs0+x") and not looks_like_srs("srs2=x")


def test_key_file_created_private_once(tmp_path: Path) -> None:
    """The key file is made 0600 with 32 random bytes on first start and never replaced."""
    path = tmp_path / "state" / "srs.key"
    old_umask = os.umask(0)
    try:
        assert ensure_key(path) is True
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = read_key(path)
    assert len(key) == 64
    assert ensure_key(path) is False and read_key(path) == key
    old = tmp_path / "old.key"
    old.write_text("an old key, long enough\n")
    keys = load_keys(path, [old])
    assert keys.current == key and keys.previous == (b"an old key, long enough",)
    old.write_text("short")
    with pytest.raises(ValueError, match="too short"):
        read_key(old)
