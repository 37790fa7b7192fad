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
