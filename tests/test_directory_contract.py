"""One contract, two backends: the LDIF file and a real slapd (no ldap3 mocks)."""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailappliance.directory import (
    DirectoryUnavailable,
    DuplicateEntry,
    InvalidAddress,
    NoSuchSubscriber,
)
from mailappliance.directory.ldap import LdapStore
from mailappliance.directory.ldif import LdifStore


@pytest.fixture(params=["ldif", "ldap"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "ldif":
        chosen: Any = LdifStore(tmp_path / "users.ldif")
    else:
        chosen = LdapStore(request.getfixturevalue("slapd").settings())
    yield chosen
    chosen.close()


@pytest.fixture
def alice(store: Any) -> Any:
    subscriber = store.add_subscriber("alice", "Alice@Example.org", "alice-password", "Alice Liddell")
    store.add_alias("alice", "alice.l@example.org")
    return subscriber


def make_certificate(serial: int, issuer: str = "Test Client CA") -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer),
                                x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'Example, "ISP"')]))
        .public_key(key.public_key()).serial_number(serial)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


def test_find_by_uid_mail_and_alias(store: Any, alice: Any) -> None:
    for login in ("alice", "ALICE", "alice@example.org", "Alice@EXAMPLE.org"):
        found = store.find_by_login(login)
        assert found is not None and found.uid == "alice" and found.mail == "alice@example.org", login
    assert store.find_by_address("alice.l@example.org").uid == "alice"
    assert store.find_by_address("ALICE.L@example.org").aliases == ("alice.l@example.org",)
    assert store.find_by_address("alice@example.org").display_name == "Alice Liddell"
    assert store.find_by_login("alice.l@example.org") is None  # aliases deliver; they are not logins
    assert store.find_by_address("nobody@example.org") is None


def test_verify_password(store: Any, alice: Any) -> None:
    subscriber = store.find_by_login("alice")
    assert store.verify_password(subscriber, "alice-password")
    assert not store.verify_password(subscriber, "wrong-password")
    assert not store.verify_password(subscriber, "")


def test_set_password(store: Any, alice: Any) -> None:
    store.set_password("alice", "new-password-1")
    subscriber = store.find_by_login("alice")
    assert store.verify_password(subscriber, "new-password-1")
    assert not store.verify_password(subscriber, "alice-password")


def test_duplicates_refused(store: Any, alice: Any) -> None:
    with pytest.raises(DuplicateEntry):
        store.add_subscriber("alice", "other@example.org", "pw-12345678")
    with pytest.raises(DuplicateEntry):
        store.add_subscriber("alice2", "alice@example.org", "pw-12345678")
    with pytest.raises(DuplicateEntry):
        store.add_subscriber("alice3", "alice.l@example.org", "pw-12345678")
    store.add_subscriber("bob", "bob@example.org", "bob-password")
    with pytest.raises(DuplicateEntry):
        store.add_alias("bob", "alice.l@example.org")
    with pytest.raises(DuplicateEntry):
        store.add_alias("bob", "alice@example.org")


def test_unknown_subscriber_errors(store: Any) -> None:
    for call in (lambda: store.set_password("ghost", "pw-12345678"), lambda: store.delete_subscriber("ghost"),
                 lambda: store.set_disabled("ghost", True), lambda: store.add_alias("ghost", "g@example.org"),
                 lambda: store.delete_alias("ghost@example.org")):
        with pytest.raises(NoSuchSubscriber):
            call()


@pytest.mark.parametrize("uid, mail", [("ok", "not-an-address"), ("ok", "a@b@example.org"),
                                       ("ok", "user%remote@example.org"), ("../etc", "x@example.org"),
                                       ("a/b", "x@example.org"), (".hidden", "x@example.org")])
def test_bad_addresses_and_uids_refused(store: Any, uid: str, mail: str) -> None:
    with pytest.raises(InvalidAddress):
        store.add_subscriber(uid, mail, "pw-12345678")


def test_disable_and_enable(store: Any, alice: Any) -> None:
    store.set_disabled("alice", True)
    assert store.find_by_login("alice").disabled
    store.set_disabled("alice", True)  # idempotent
    store.set_disabled("alice", False)
    assert not store.find_by_login("alice").disabled


def test_delete(store: Any, alice: Any) -> None:
    store.delete_subscriber("alice@example.org")
    assert store.find_by_login("alice") is None
    assert store.find_by_address("alice.l@example.org") is None


def test_alias_delete(store: Any, alice: Any) -> None:
    store.delete_alias("alice.l@example.org")
    assert store.find_by_address("alice.l@example.org") is None
    with pytest.raises(NoSuchSubscriber):
        store.delete_alias("alice.l@example.org")


def test_list_sorted(store: Any) -> None:
    for uid in ("carol", "alice", "bob"):
        store.add_subscriber(uid, f"{uid}@example.org", None)
    assert [s.uid for s in store.list_subscribers()] == ["alice", "bob", "carol"]


@pytest.mark.parametrize("login", ["*", "alice)(uid=*", "*)(|(uid=*", "alice*", "\\2a", "(uid=alice)"])
def test_filter_injection_finds_nothing(store: Any, alice: Any, login: str) -> None:
    assert store.find_by_login(login) is None
    assert store.find_by_address(login) is None


def test_certificates(store: Any, alice: Any) -> None:
    der, other = make_certificate(1001), make_certificate(1002)
    assert store.find_by_certificate(der) is None
    store.add_certificate("alice", der)
    assert store.find_by_certificate(der).uid == "alice"
    assert store.find_by_certificate(other) is None
    assert store.find_by_login("alice").certificates == (der,)
    store.add_subscriber("bob", "bob@example.org", None)
    with pytest.raises(DuplicateEntry):
        store.add_certificate("bob", der)
    store.remove_certificate("alice", der)
    assert store.find_by_certificate(der) is None
    with pytest.raises(NoSuchSubscriber):
        store.remove_certificate("alice", der)


def test_same_serial_other_issuer_is_not_a_match(store: Any, alice: Any) -> None:
    store.add_certificate("alice", make_certificate(7))
    assert store.find_by_certificate(make_certificate(7, issuer="Other CA")) is None


def test_ldif_file_edits_are_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "users.ldif"
    store = LdifStore(path)
    assert store.find_by_login("zoe") is None
    LdifStore(path).add_subscriber("zoe", "zoe@example.org", "zoe-password")  # another process's change
    time.sleep(0.01)
    assert store.find_by_login("zoe").mail == "zoe@example.org"
    path.write_text(path.read_text().replace("zoe@example.org", "zoe.new@example.org"))
    assert store.find_by_address("zoe.new@example.org") is not None


def test_ldif_syntax_error_is_temporary_and_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "users.ldif"
    path.write_text("dn: uid=a,dc=x\nbroken line\n")
    with pytest.raises(DirectoryUnavailable, match="line 2"):
        LdifStore(path).find_by_login("a")


def test_ldap_outage_is_temporary_and_recovers(slapd: Any) -> None:
    store = LdapStore(slapd.settings(timeout=1))
    store.add_subscriber("alice", "alice@example.org", "alice-password")
    subscriber = store.find_by_login("alice")
    slapd.stop()
    try:
        with pytest.raises(DirectoryUnavailable):
            store.find_by_login("alice")
        with pytest.raises(DirectoryUnavailable):
            store.verify_password(subscriber, "alice-password")
    finally:
        slapd.start()
    assert store.find_by_login("alice").uid == "alice"  # the same store, no restart
    assert store.verify_password(subscriber, "alice-password")


def test_ldap_service_account_cannot_read_passwords(slapd: Any) -> None:
    import ldap3

    LdapStore(slapd.settings()).add_subscriber("alice", "alice@example.org", "alice-password")
    conn = ldap3.Connection(slapd.url, slapd.bind_dn, slapd.bind_password, auto_bind=True)
    conn.search(slapd.base_dn, "(uid=alice)", attributes=["userPassword", "mail"])
    [entry] = conn.response
    assert entry["attributes"]["mail"] == ["alice@example.org"]
    assert not entry["attributes"].get("userPassword")


def test_ldap_hung_server_is_temporary_and_recovers(slapd: Any) -> None:
    """A frozen slapd (accepts, never answers) is worse than a dead one: the timeout must hold."""
    store = LdapStore(slapd.settings(timeout=1))
    store.add_subscriber("alice", "alice@example.org", "alice-password")
    subscriber = store.find_by_login("alice")
    slapd.pause()
    try:
        with pytest.raises(DirectoryUnavailable, match="timed out"):
            store.find_by_login("alice")
        with pytest.raises(DirectoryUnavailable):
            store.verify_password(subscriber, "alice-password")
    finally:
        slapd.resume()
    assert store.find_by_login("alice").uid == "alice"
    assert store.verify_password(subscriber, "alice-password")
    store.close()


def test_ldap_lists_more_than_the_default_size_limit(slapd: Any, ldap_store: LdapStore) -> None:
    """OpenLDAP answers 500 entries by default; the service account's olcLimits lifts that."""
    with slapd.admin_connection() as conn:
        for i in range(600):
            conn.add(f"uid=u{i:03d},{slapd.base_dn}", ["inetOrgPerson"],
                     {"uid": f"u{i:03d}", "mail": f"u{i:03d}@example.org", "cn": "u", "sn": "u"})
    listed = ldap_store.list_subscribers()
    assert [s.uid for s in listed] == [f"u{i:03d}" for i in range(600)]


def test_ldap_entries_made_with_ldap_tools(slapd: Any, ldap_store: LdapStore) -> None:
    """An admin's ldapadd with a {SSHA} hash works; entries lacking uid or mail are ignored."""
    from mailappliance.directory.passwords import make_ssha

    slapd.add_ldif(f"""\
dn: uid=carol,{slapd.base_dn}
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: carol
cn: Carol
sn: Carol
mail: Carol@Example.org
mailLocalAddress: c@example.org
employeeType: disabled
userPassword: {make_ssha("carol-password")}

dn: uid=nomail,{slapd.base_dn}
objectClass: inetOrgPerson
uid: nomail
cn: No Mail
sn: No Mail

dn: cn=nouid,{slapd.base_dn}
objectClass: inetOrgPerson
cn: nouid
sn: nouid
mail: nouid@example.org
""")
    carol = ldap_store.find_by_address("C@EXAMPLE.ORG")
    assert carol is not None and carol.mail == "carol@example.org" and carol.disabled
    assert ldap_store.verify_password(carol, "carol-password")
    assert ldap_store.find_by_login("nomail") is None
    assert ldap_store.find_by_address("nouid@example.org") is None
    assert [s.uid for s in ldap_store.list_subscribers()] == ["carol"]


def test_ldap_admin_methods_need_admin_bind_dn(slapd: Any) -> None:
    import attrs

    from mailappliance.directory import DirectoryAdminError

    store = LdapStore(attrs.evolve(slapd.settings(), admin_bind_dn="", admin_bind_password=""))
    with pytest.raises(DirectoryAdminError, match="directory.ldap.admin_bind_dn"):
        store.add_subscriber("alice", "alice@example.org", "alice-password")
    assert store.list_subscribers() == []  # lookups need only the service account
    store.close()


def test_ldap_store_is_shared_by_threads(ldap_store: LdapStore) -> None:
    """The daemon calls one store from several pool threads; close() from another thread."""
    from concurrent.futures import ThreadPoolExecutor

    for uid in ("alice", "bob", "carol"):
        ldap_store.add_subscriber(uid, f"{uid}@example.org", f"{uid}-password")

    def check(n: int) -> bool:
        uid = ("alice", "bob", "carol")[n % 3]
        subscriber = ldap_store.find_by_address(f"{uid}@example.org")
        return subscriber is not None and subscriber.uid == uid and ldap_store.verify_password(
            subscriber, f"{uid}-password")

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(check, range(120)))
        ldap_store.close()  # unbinds every worker's connection ...
        assert all(pool.map(check, range(30)))  # ... and the store reconnects on demand


def test_verify_unknown_always_refuses(store: Any, alice: Any) -> None:
    """The stand-in check for a login that finds nobody never says yes, even to a real password."""
    assert store.verify_unknown("alice-password") is False
    assert store.verify_unknown("") is False


@pytest.mark.parametrize("name", ["Mallory\x1cmailLocalAddress: alice@example.org", "a\nmail: x@example.org",
                                  "x" * 129])
def test_display_names_are_validated(store: Any, name: str) -> None:
    """A display name with a control character (or too long) is refused by both backends."""
    with pytest.raises(InvalidAddress):
        store.add_subscriber("mallory", "mallory@example.org", None, name)
    assert store.find_by_login("mallory") is None


def test_non_ascii_display_name_round_trips(store: Any) -> None:
    """A printable non-ASCII name is kept exactly (LDIF writes it base64)."""
    store.add_subscriber("zoe", "zoe@example.org", None, "Zoë Ünal: <ceo> ")
    assert store.find_by_login("zoe").display_name == "Zoë Ünal: <ceo>"
