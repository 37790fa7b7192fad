"""TLS records with fewer calls into OpenSSL: the receive and send paths of an
established TLS connection (Twisted's ``TLSMemoryBIOProtocol`` on pyOpenSSL's
memory BIOs), used by :mod:`mailappliance.sessions` once the handshake is done.
Everything else (the handshake, writes waiting for it, close_notify, errors)
stays Twisted's own code."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from OpenSSL import SSL
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol

# -- reading records: fewer calls into OpenSSL per record ------------------------------

_lib, _ffi = SSL._lib, SSL._ffi  # type: ignore[attr-defined]  # pyOpenSSL's cffi bindings
_no_zero = _ffi.new_allocator(should_clear_after_alloc=False)
_MAX_PLAINTEXT = 16 * 1024  # one TLS record's data at most: one SSL_read takes a whole record
_WANT_READ, _NULL = _lib.SSL_ERROR_WANT_READ, _ffi.NULL


class _Records:
    """The record paths of one TLS connection (a small slotted object: it lives as
    long as its connection, and two closures cost three times its memory)."""

    __slots__ = ("tls", "connection", "ssl", "into", "out")

    def __init__(self, tls: TLSMemoryBIOProtocol) -> None:
        self.tls = tls
        self.connection = connection = tls._tlsConnection
        self.ssl, self.into, self.out = connection._ssl, connection._into_ssl, connection._from_ssl

    def data_received(self, data: bytes) -> None:
        tls = self.tls
        if not tls._handshakeDone or tls._appSendBuffer or tls._lostTLSConnection:
            type(tls).dataReceived(tls, data)
            return
        ssl = self.ssl
        self.connection.bio_write(data)
        while not tls._lostTLSConnection:
            buffer = _no_zero("char[]", _MAX_PLAINTEXT)
            result = _lib.SSL_read(ssl, buffer, _MAX_PLAINTEXT)
            if result <= 0:
                if _lib.SSL_get_error(ssl, result) != _WANT_READ:
                    tls._flushReceiveBIO()  # Twisted's handling of close_notify and errors
                    return
                break
            if not tls._aborted:
                ProtocolWrapper.dataReceived(tls, _ffi.buffer(buffer, result)[:])
            # a read shorter than the buffer took the rest of its record (a record carries
            # 16 KiB at most): only a full one asks OpenSSL (one GIL release less per record)
            if (result < _MAX_PLAINTEXT or not _lib.SSL_pending(ssl)) and not _lib.BIO_get_mem_data(self.into, _NULL):
                break  # no record left to read
        if not tls._lostTLSConnection and _lib.BIO_get_mem_data(self.out, _NULL):
            tls._flushSendBIO()  # reading made output (a TLS 1.3 key update's answer)

    def write(self, data: bytes) -> None:
        tls = self.tls
        if type(data) is not bytes or not data or len(data) > _MAX_PLAINTEXT or not tls._handshakeDone \
                or tls._appSendBuffer or tls._lostTLSConnection or tls.disconnecting \
                or _lib.SSL_write(self.ssl, data, len(data)) <= 0:
            TLSMemoryBIOProtocol.write(tls, data)
            return
        tls._flushSendBIO()

    def write_last(self, data: bytes) -> bool:
        """Encrypt ``data`` as a record and leave it in the outgoing BIO, where the
        close_notify that follows joins it: the last reply and the close leave in one
        send (``sessions.write_and_close``).  False, with nothing written, where
        ``write`` would hand over to Twisted, or while a producer would delay the close."""
        tls = self.tls
        if type(data) is not bytes or not data or len(data) > _MAX_PLAINTEXT or not tls._handshakeDone \
                or tls._appSendBuffer or tls._lostTLSConnection or tls.disconnecting \
                or tls._producer is not None or _lib.SSL_write(self.ssl, data, len(data)) <= 0:
            return False
        return True

    def flush(self) -> None:
        """Hand over whatever the outgoing BIO holds (a record ``write_last`` left there)."""
        if not self.tls._lostTLSConnection and _lib.BIO_get_mem_data(self.out, _NULL):
            self.tls._flushSendBIO()


def _records(tls: TLSMemoryBIOProtocol) -> _Records | None:
    """The connection's record paths, made once; None for a connection without memory BIOs."""
    records = installed_records(tls)  # made for the other path
    if records is not None:
        return records
    connection = tls._tlsConnection
    if connection._into_ssl is None or connection._from_ssl is None:
        return None
    return _Records(tls)


def read_records_directly(tls: TLSMemoryBIOProtocol) -> None:
    """Give an established TLS connection a receive path with about half the calls
    into OpenSSL per record (Twisted's ``dataReceived`` + pyOpenSSL: eight, two of
    them failing with an exception).

    Each such call releases the GIL, and while the commit thread waits for it every
    release is a futex wake and a spurious wake-up of that thread (submission made
    ~23 futex calls per message against ~3 for plain inbound).  Here a record is
    read with one ``SSL_read``, and the mem BIOs' lengths say whether another read
    or a flush of the outgoing BIO is due; nothing is read twice to learn it is
    empty.  During the handshake, with writes waiting for the handshake, after
    the connection ends, and for any answer of ``SSL_read`` but data or
    "want read" (close_notify, errors), Twisted's own code runs.
    """
    records = _records(tls)
    if records is not None:
        tls.dataReceived = records.data_received  # type: ignore[method-assign]


def installed_records(tls: TLSMemoryBIOProtocol) -> _Records | None:
    """The record paths ``read_records_directly``/``write_records_directly`` installed on
    ``tls``; None on Twisted's own paths."""
    for installed in (vars(tls).get("write"), vars(tls).get("dataReceived")):
        records = getattr(installed, "__self__", None)
        if isinstance(records, _Records):
            return records
    return None


def write_records_directly(tls: TLSMemoryBIOProtocol) -> Callable[[bytes], None]:
    """A ``write`` for an established TLS connection that makes each write one record
    with one ``SSL_write`` (pyOpenSSL's ``send`` adds an ``SSL_get_error`` call, a GIL
    release, to every successful write) and hands it to the connection beneath.
    More than one record's data, writes before the handshake is done or while
    earlier ones wait for it, after the connection ends, and any failure of
    ``SSL_write`` go to Twisted's own write (which retries with the same bytes, as
    OpenSSL asks, and buffers or ends the connection)."""
    records = _records(tls)
    return records.write if records is not None else partial(TLSMemoryBIOProtocol.write, tls)
