"""The server TLS context's choices that cost CPU per handshake (tls.ServerTLS)."""

from __future__ import annotations

import ssl
from typing import Any

from OpenSSL import SSL

from mailappliance.tls import ServerTLS


def handshake(server: ServerTLS, client: ssl.SSLContext) -> ssl.SSLObject:
    """A full handshake between ``server`` and ``client`` over memory BIOs; the client's end."""
    tls = SSL.Connection(server.getContext(), None)
    tls.set_accept_state()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    end = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
    for _ in range(10):
        try:
            end.do_handshake()
            return end
        except ssl.SSLWantReadError:
            tls.bio_write(outgoing.read())
            try:
                tls.do_handshake()
            except SSL.WantReadError:
                pass
            incoming.write(tls.bio_read(1 << 16))
    raise AssertionError("no handshake")


def test_tls13_prefers_aes128_gcm_sha256(pki: Any) -> None:
    """A default client gets TLS 1.3 with AES-128-GCM-SHA256 (SHA-256 key schedule: cheaper than SHA-384)."""
    end = handshake(ServerTLS(pki.server_cert, pki.server_key), pki.client_context())
    assert end.version() == "TLSv1.3"
    assert end.cipher()[0] == "TLS_AES_128_GCM_SHA256"


def test_tls12_still_prefers_ecdhe_aes128_gcm(pki: Any) -> None:
    """TLS 1.2 keeps its forward-secret AEAD list, AES-128-GCM first."""
    client = pki.client_context()
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    end = handshake(ServerTLS(pki.server_cert, pki.server_key), client)
    assert end.version() == "TLSv1.2"
    assert end.cipher()[0].startswith("ECDHE-") and "AES128-GCM" in end.cipher()[0]
