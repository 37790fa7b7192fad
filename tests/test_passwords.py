"""userPassword hash schemes understood by the LDIF backend."""

from __future__ import annotations

import pytest

from mailappliance.directory.passwords import hash_password, make_ssha, scheme_of, verify_password


@pytest.mark.parametrize("make", [hash_password, make_ssha, lambda p: make_ssha(p, "sha512")])
def test_each_scheme_verifies_right_and_refuses_wrong(make) -> None:
    stored = make("correct horse")
    assert scheme_of(stored) in ("ARGON2", "SSHA", "SSHA512")
    assert verify_password(stored, "correct horse")
    assert not verify_password(stored, "correct horsE")
    assert not verify_password(stored, "")


def test_new_hashes_are_argon2id() -> None:
    assert hash_password("x" * 10).startswith("{ARGON2}$argon2id$")


def test_openldap_ssha_vector() -> None:
    # produced by `slappasswd -h {SSHA} -s secret` with salt b"salt1234"
    import base64
    import hashlib

    stored = "{SSHA}" + base64.b64encode(hashlib.sha1(b"secretsalt1234").digest() + b"salt1234").decode()
    assert verify_password(stored, "secret")


@pytest.mark.parametrize("stored", ["secret", "{CLEARTEXT}secret", "{SSHA}!!!", "{SSHA}", "{ARGON2}junk", "{MD5}x"])
def test_cleartext_unknown_and_broken_values_never_match(stored: str) -> None:
    assert not verify_password(stored, "secret")


NFC, NFD = "pässwörd-ünïcode", "pa\u0308sswo\u0308rd-u\u0308ni\u0308code"


def test_normal_form_is_saslprep() -> None:
    """SASLprep (RFC 4013): non-ASCII spaces to U+0020, soft hyphens and zero-width joiners
    dropped, NFKC; the same as ldap3 applies to every simple bind."""
    from ldap3.protocol.sasl.sasl import sasl_prep

    from mailappliance.directory.passwords import normalize_password

    for typed, normal in ((NFD, NFC), ("a\u00a0b\u3000c", "a b c"), ("ｆｕｌｌ", "full"),
                          ("soft\u00adhy\u200dphen", "softhyphen"), ("plain ascii", "plain ascii")):
        assert normalize_password(typed) == normal == sasl_prep(typed)


def test_candidates_try_the_typed_form_only_when_it_differs() -> None:
    """Old hashes of an unnormalised password keep working: the typed form is the second try."""
    from mailappliance.directory.passwords import password_candidates

    assert password_candidates(NFC) == (NFC,)
    assert password_candidates(NFD) == (NFC, NFD)


def test_new_hashes_are_of_the_normal_form() -> None:
    """A password set in NFD verifies in NFC (what another keyboard sends)."""
    assert verify_password(hash_password(NFD), NFC)


@pytest.mark.parametrize("password, reason", [("short", "at least 8"), ("x" * 1025, "at most 1024"),
                                              ("good-pass\x00", "control"), ("good\npass", "control"),
                                              ("private\ue000use", "private"), ("\u00ad" * 9, "normalize")])
def test_new_passwords_are_validated(password: str, reason: str) -> None:
    """What an admin sets: 8-1024 characters, nothing SASLprep prohibits."""
    from mailappliance.directory import InvalidAddress
    from mailappliance.directory.passwords import validate_new_password

    with pytest.raises(InvalidAddress, match=reason):
        validate_new_password(password)


@pytest.mark.parametrize("stored", [[], ["{SSHA}!!!"], ["secret"], [make_ssha("other")], ["{ARGON2}junk"]])
def test_a_refusal_without_an_argon2_check_spends_one(stored: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """No stored hash, a broken one or a fast {SSHA}: a refusal still costs one Argon2 check."""
    from mailappliance.directory import passwords

    spent: list[str] = []
    monkeypatch.setattr(passwords, "spend_a_check", lambda p: spent.append(p) or False)
    assert not passwords.verify_stored(stored, "guess-1234")
    assert spent == ["guess-1234"]


def test_a_refusal_by_argon2_spends_nothing_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real Argon2 refusal already costs one check; a match is never slowed."""
    from mailappliance.directory import passwords

    spent: list[str] = []
    monkeypatch.setattr(passwords, "spend_a_check", lambda p: spent.append(p) or False)
    assert not passwords.verify_stored([hash_password("right-pass")], "wrong-pass")
    assert passwords.verify_stored([make_ssha("right-pass")], "right-pass")
    assert spent == []


def test_spend_a_check_always_refuses() -> None:
    """The dummy hash matches nothing."""
    from mailappliance.directory.passwords import spend_a_check

    assert spend_a_check("") is False and spend_a_check("anything at all") is False


def test_argon2id_hashes_are_checked_by_libsodium_with_the_same_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    """An argon2-cffi Argon2id hash goes to libsodium (half the CPU): right matches, wrong does not."""
    import nacl.pwhash

    from mailappliance.directory import passwords

    calls: list[bytes] = []
    real = nacl.pwhash.verify
    monkeypatch.setattr(nacl.pwhash, "verify", lambda h, p: calls.append(h) or real(h, p))
    stored = hash_password("right-pass")
    assert verify_password(stored, "right-pass") and not verify_password(stored, "wrong-pass")
    assert len(calls) == 2 and passwords.spend_a_check("x") is False and len(calls) == 3


def test_hashes_libsodium_cannot_check_still_verify() -> None:
    """Argon2i, or a hash under 16 bytes, is checked by argon2-cffi as before; a malformed one never matches."""
    from argon2 import PasswordHasher, Type

    for hasher in (PasswordHasher(type=Type.I, memory_cost=8192, time_cost=1),
                   PasswordHasher(hash_len=8, memory_cost=8192)):
        stored = "{ARGON2}" + hasher.hash("right-pass")
        assert verify_password(stored, "right-pass") and not verify_password(stored, "wrong-pass")
    assert not verify_password("{ARGON2}$argon2id$v=19$m=65536,t=3,p=4$bad$bad", "right-pass")
