"""The TLS receive path with fewer calls into OpenSSL (``tls_records.read_records_directly``)
against a client that cuts its input into the smallest records, or sends records
that fail to decrypt in the middle of good ones: the session sees exactly what
Twisted's own path would give it, and nothing after a bad record."""

from __future__ import annotations

import pytest

from tests.test_tls_records import Pair


@pytest.mark.parametrize("direct", [True, False])
def test_thousands_of_one_byte_records_in_one_read(pki, direct: bool) -> None:
    """3,000 one-byte records arriving in one read reach the session in order, one piece each, on both paths."""
    pair = Pair(pki, direct)
    text = bytes(65 + i % 26 for i in range(3000))
    for byte in text:
        pair.client.write(bytes([byte]))
    pair.to_server(pair.outgoing.read())
    assert b"".join(pair.app.received) == text
    assert len(pair.app.received) == 3000


@pytest.mark.parametrize("direct", [True, False])
def test_a_forged_record_between_good_ones_ends_the_connection(pki, direct: bool) -> None:
    """Good record, forged record, good record in one read: the first is delivered, the connection ends
    at the forged one, and the record after it never reaches the session."""
    pair = Pair(pki, direct)
    pair.client.write(b"MAIL FROM:<alice@example.org>\r\n")
    good = pair.outgoing.read()
    pair.client.write(b"RCPT TO:<victim@remote.example>\r\n")
    after = pair.outgoing.read()
    forged = bytearray(after)
    forged[-1] ^= 1  # the authentication tag no longer matches
    pair.to_server(good + bytes(forged) + after)
    assert pair.app.received == [b"MAIL FROM:<alice@example.org>\r\n"]
    assert pair.lower.closed
