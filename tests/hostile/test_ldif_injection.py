"""Issue 11, finding 5: LDIF injection through `mailappliance-admin user add --name`.

A display name holding \\x1c (or \\x0b \\x0c \\x1d \\x1e) was written raw and
str.splitlines() split it when the file was read again: the rest of the name
became an attribute of its own (`mailLocalAddress: alice@example.org` gave
mallory alice's address), or a whole new entry with a chosen password.
"""

from __future__ import annotations

import base64
from typing import Callable

import pytest

from mailappliance.directory.ldif import LdifStore
from mailappliance.directory.passwords import make_ssha
from tests.daemon import Appliance

STEAL_ADDRESS = "Mallory\x1cmailLocalAddress: alice@example.org"
NEW_ENTRY = ("Mallory\x1c\x1cdn: uid=evil,ou=people,dc=example,dc=org\x1cobjectClass: inetOrgPerson"
             "\x1cuid: evil\x1cmail: evil@example.org\x1cuserPassword: " + make_ssha("evil-password"))


@pytest.mark.parametrize("separator", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\n"])
def test_cli_refuses_a_name_with_a_line_separator(appliance: Callable[..., Appliance], separator: str) -> None:
    """`user add --name` with a control character exits 1 and leaves the directory as it was."""
    instance = appliance(start=False)
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    before = (instance.root / "users.ldif").read_bytes()
    name = STEAL_ADDRESS.replace("\x1c", separator)
    added = instance.admin("user", "add", "mallory@example.org", "--name", name, password="mallory-password")
    assert added.returncode == 1 and "unprintable character" in added.stderr, added.stderr
    assert (instance.root / "users.ldif").read_bytes() == before
    store = LdifStore(instance.root / "users.ldif")
    assert store.find_by_login("mallory") is None
    assert store.find_by_address("alice@example.org").uid == "alice"


@pytest.mark.parametrize("name", [STEAL_ADDRESS, NEW_ENTRY])
def test_a_hostile_name_already_in_the_directory_survives_a_rewrite(
        appliance: Callable[..., Appliance], name: str) -> None:
    """An entry made with other tools (cn base64, holding \\x1c) is rewritten base64 and read back whole."""
    instance = appliance(start=False)
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    ldif = instance.root / "users.ldif"
    encoded = base64.b64encode(name.encode()).decode()
    with open(ldif, "a") as f:
        f.write(f"\ndn: uid=mallory,ou=people,dc=example,dc=org\nobjectClass: inetOrgPerson\n"
                f"uid: mallory\nmail: mallory@example.org\ncn:: {encoded}\nsn: M\n")
    # any admin change rewrites the whole file; then the daemon and the tool read it again
    assert instance.admin("alias", "add", "mallory", "m2@example.org").returncode == 0
    assert instance.admin("user", "add", "bob@example.org", "--no-password").returncode == 0
    store = LdifStore(ldif)
    mallory = store.find_by_login("mallory")
    assert mallory.display_name == name
    assert mallory.aliases == ("m2@example.org",) and not mallory.owns_address("alice@example.org")
    assert store.find_by_login("evil") is None
    assert [s.uid for s in store.list_subscribers()] == ["alice", "bob", "mallory"]
    assert b"\x1c" not in ldif.read_bytes()


@pytest.mark.parametrize("args, complaint", [
    (("user", "add", "x@example.org", "--uid", "../escape", "--no-password"), "not a valid uid"),
    (("user", "add", "x@example.org", "--uid", "a..b", "--no-password"), "not a valid uid"),
    (("user", "add", "x\x1c@example.org", "--no-password"), "not a valid local part"),
    (("user", "add", "x@example.org", "--name", "y" * 129, "--no-password"), "at most 128"),
    (("alias", "add", "alice", "a\x0bb@example.org"), "not a valid local part"),
])
def test_cli_validates_every_value(appliance: Callable[..., Appliance], args: tuple[str, ...],
                                   complaint: str) -> None:
    """uids, addresses and names from the command line are checked before anything is written."""
    instance = appliance(start=False)
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    refused = instance.admin(*args)
    assert refused.returncode == 1 and complaint in refused.stderr, refused.stderr


def test_cli_refuses_a_password_with_control_characters(appliance: Callable[..., Appliance]) -> None:
    """A password with a control character is refused (it could never be typed into a mail program)."""
    instance = appliance(start=False)
    refused = instance.admin("user", "add", "alice@example.org", password="alice\x1cpassword")
    assert refused.returncode == 1 and "control character" in refused.stderr, refused.stderr


@pytest.mark.parametrize("action", ["show", "retry", "delete"])
def test_cli_queue_ids_are_file_names_not_paths(appliance: Callable[..., Appliance], action: str) -> None:
    """`queue show|retry|delete ../x` is an unknown message, never a path outside the queue."""
    instance = appliance(start=False)
    (instance.root / "spool" / "queue").mkdir(parents=True)
    (instance.root / "victim.json").write_text("{}")
    (instance.root / "victim.eml").write_text("x")
    refused = instance.admin("queue", action, "../../victim")
    assert refused.returncode == 1 and "no queued message" in refused.stderr, refused.stderr
    assert (instance.root / "victim.json").exists() and (instance.root / "victim.eml").exists()
