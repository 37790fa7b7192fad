"""Issue 11, finding 12 (passwords): passwords were not normalised.

"é" typed as one code point (most keyboards) and as "e" + combining accent
(macOS input methods, some phones) are the same password to the subscriber;
they were different passwords to the LDIF backend.  Now passwords are
normalised (SASLprep, RFC 4013, as ldap3 does for every LDAP bind) when set
and when checked, and a hash stored before that still works with the
password as it was typed.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Callable

import pytest
from argon2 import PasswordHasher

from mailappliance.directory.ldif import LdifStore
from mailappliance.directory.threaded import Directory
from tests.daemon import Appliance

NFD = unicodedata.normalize("NFD", "pässwörd-1234")
NFC = unicodedata.normalize("NFC", NFD)
NBSP = "open\u00a0sesame-99"
FULLWIDTH = "ｗｉｄｅ-password"


@pytest.mark.parametrize("stored, typed", [(NFD, NFC), (NFC, NFD), (NBSP, "open sesame-99"),
                                           (FULLWIDTH, "wide-password")])
def test_a_password_set_in_one_form_logs_in_in_another(appliance: Callable[..., Appliance],
                                                       stored: str, typed: str) -> None:
    """`user add` then `test-login` (the daemon's own checker) with the other form of the same password."""
    instance = appliance(start=False)
    assert instance.admin("user", "add", "alice@example.org", password=stored).returncode == 0
    checked = instance.admin("test-login", "alice", password=typed)
    assert checked.returncode == 0 and "ok: alice is uid=alice" in checked.stdout, checked.stdout
    wrong = instance.admin("test-login", "alice", password=typed + "x")
    assert wrong.returncode == 1


def test_a_hash_of_an_unnormalised_password_still_works(appliance: Callable[..., Appliance]) -> None:
    """A hash made before normalisation (of the NFD form) still takes the NFD password."""
    instance = appliance(start=False)
    assert instance.admin("user", "add", "alice@example.org", "--no-password").returncode == 0
    ldif = instance.root / "users.ldif"
    ldif.write_text(ldif.read_text().replace(
        "mail: alice@example.org", "mail: alice@example.org\nuserPassword: {ARGON2}" + PasswordHasher().hash(NFD)))
    assert LdifStore(ldif).find_by_login("alice") is not None
    checked = instance.admin("test-login", "alice", password=NFD)
    assert checked.returncode == 0, checked.stdout


@pytest.mark.parametrize("stored, typed", [(NFD, NFC), (NBSP, "open sesame-99")])
def test_ldap_passwords_are_normalised_when_set_and_checked(ldap_store: Any, stored: str, typed: str) -> None:
    """LDAP: the Password Modify exop gets the normal form; the bind tries it first."""
    ldap_store.add_subscriber("alice", "alice@example.org", stored)
    assert Directory(ldap_store, reactor=None)._authenticate("alice", typed).uid == "alice"
    ldap_store.set_password("alice", typed)
    assert Directory(ldap_store, reactor=None)._authenticate("alice", stored).uid == "alice"


def test_ldap_password_set_by_other_tools_in_nfd_still_works(slapd: Any, ldap_store: Any) -> None:
    """A password set with ldappasswd (which sends it as typed, not normalised) still binds when
    typed the same way."""
    subscriber = ldap_store.add_subscriber("alice", "alice@example.org", None)
    with slapd.admin_connection() as conn:  # bytes: ldap3 sends them as they are, as ldappasswd does
        assert conn.extend.standard.modify_password(user=subscriber.dn, new_password=NFD.encode())
    assert Directory(ldap_store, reactor=None)._authenticate("alice", NFD).uid == "alice"


@pytest.mark.parametrize("password", ["bad\x01control", "\u00ad\u00ad", "mixed\u05d0bidi"])
def test_ldap_password_saslprep_prohibits_is_a_refusal_not_an_outage(ldap_store: Any, password: str) -> None:
    """A client's password that SASLprep prohibits is refused like any wrong one; the server stays up."""
    ldap_store.add_subscriber("alice", "alice@example.org", "alice-password")
    directory = Directory(ldap_store, reactor=None)
    assert directory._authenticate("alice", password) is None
    assert directory._authenticate("nobody-here", password) is None
    assert directory._authenticate("alice", "alice-password").uid == "alice"
    assert all(up for _, up in ldap_store.server_states())
