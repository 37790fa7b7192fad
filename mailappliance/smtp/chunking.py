"""CHUNKING (RFC 3030): the message in BDAT chunks instead of DATA.

``BDAT <size> [LAST]`` is followed by exactly ``size`` octets of message,
never read as commands.  The chunks feed the same
:class:`~mailappliance.delivery.Delivery` as DATA (our Return-Path,
Delivered-To and Received first), and the LAST chunk ends in the same
``end_of_data``: the same refusals, message authentication, quotas and
commit, the same 250 only after fsync.

The rules that hold for DATA hold here (decided, RFC 3030 leaves them open):

- BINARYMIME is not offered (``BODY=BINARYMIME`` is refused at MAIL), so a
  chunk carries text: a bare CR or LF anywhere refuses the message
  (550 5.6.0, or turned into CRLF with ``bare_line_endings = "normalize"``),
  a line longer than ``max_line_length`` too.  A chunk boundary may fall
  between CR and LF.  Chunks are not dot-stuffed, so ``<CRLF>.<CRLF>`` inside
  a chunk is message text, never an end of message (no smuggling through it);
  the copy we relay is dot-stuffed by the outbound client as usual.
- Size: a chunk that would take the message past ``max_message_size`` is
  refused (552 5.3.4) when it is announced; its octets are skipped if there
  are no more of them than the limit, otherwise the session ends (nobody
  reads gigabytes only to throw them away).  A refused BDAT (no MAIL, no
  recipient, after HELO) skips its octets the same way.
- Time: ``data_time_limit`` runs from the first chunk to LAST; a declared
  chunk that never arrives ends at the idle timeout; nothing is kept.
- DATA after BDAT in one transaction is refused (503) and ends it; so is
  RCPT after the first chunk (our trace fields already name the recipients).
- The session kernel's input bounds hold: chunk octets go to the Delivery as
  they arrive (spilled to disk past 1 MiB); during the commit after LAST
  pipelined input waits within ``max_pending_input``.
"""

from __future__ import annotations

import re

import attrs

from mailappliance.smtp import replies
from mailappliance.smtp.data import DataReader
from mailappliance.smtp.session_base import SMTPSessionBase

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
MAX_SIZE_DIGITS = 20


class ChunkReader(DataReader):
    """Consumes BDAT chunk octets: no dot-stuffing and no terminator, otherwise
    the checks of :class:`DataReader` (bare CR/LF, line length, size, hops)."""

    def feed(self, data: bytes) -> None:  # no terminator: nothing ever follows the end
        buffer = self._pending + data
        last = buffer.rfind(b"\r\n")
        if last >= 0:
            self._consume(buffer[: last + 2])
            buffer = buffer[last + 2 :]
        self._pending = self._bounded(buffer)

    def finish(self) -> None:
        """After LAST: an unterminated last line gets its CRLF (a lone CR there is bare)."""
        tail, self._pending = self._pending, b""
        if tail:
            self._consume(tail + b"\r\n")

    def _unstuff(self, segment: bytes, dots: bool = True) -> bytes:
        return segment  # chunks are not dot-stuffed: a leading dot is message text


@attrs.define
class ChunkedTransfer:
    """A message arriving in BDAT chunks: what has been announced and read."""

    reader: ChunkReader
    remaining: int = 0  # octets of the current chunk still to come
    chunk_size: int = 0
    last: bool = False
    announced: int = 0  # octets announced by every BDAT so far


def parse_bdat(argument: str) -> tuple[int, bool] | None:
    """``<size> [LAST]`` -> (size, last); None when the size cannot be read."""
    words = argument.split()
    if not 1 <= len(words) <= 2:
        return None
    size = words[0]
    if not (size.isascii() and size.isdigit() and len(size) <= MAX_SIZE_DIGITS):
        return None
    if len(words) == 2 and words[1].upper() != "LAST":
        return None
    return int(size), len(words) == 2


class ChunkingCommands(SMTPSessionBase):
    """BDAT; a mixin of the SMTP session beside MailTransaction (its state,
    ``chunked`` and ``skip_octets``, is declared and slotted in SMTPSessionBase)."""

    def smtp_BDAT(self, argument: str) -> None:
        parsed = parse_bdat(argument)
        if parsed is None:  # nobody knows where the chunk ends: no byte after this is a command
            self.log_event(self.log.info, "BDAT with an unreadable chunk size: closing")
            self.close_with(replies.Reply(421, "4.5.0", f"{self.config.hostname} Error: cannot read BDAT size"))
            return
        size, last = parsed
        transaction = self.transaction
        limit = self.config.max_message_size
        if not self.esmtp:
            refusal = replies.NEED_EHLO
        elif transaction is None:
            refusal = replies.NEED_MAIL
        elif not transaction.recipient_count:
            refusal = replies.NO_VALID_RECIPIENTS
        elif (self.chunked.announced if self.chunked else 0) + size > limit:
            self.log_event(self.log.info, "BDAT refused: {size} more octets pass the size limit", size=size)
            refusal = replies.MESSAGE_TOO_BIG
        else:
            refusal = None
        if refusal is not None:
            self._refuse_chunk(size, refusal)
            return
        assert transaction is not None
        if self.chunked is None:
            if not self.start_message(transaction):  # answered (451): the chunk still must go
                self.skip_octets = size
                return
            assert self.delivery is not None
            self.chunked = ChunkedTransfer(ChunkReader(
                self.delivery.write, limit, self.config.max_line_length,
                normalize_line_endings=self.config.normalize_line_endings))
            self.data_started = self.clock.seconds()
        chunked = self.chunked
        chunked.remaining = chunked.chunk_size = size
        chunked.last = last
        chunked.announced += size
        if not size:
            self._chunk_complete()

    def _refuse_chunk(self, size: int, refusal: replies.Reply) -> None:
        """Refuse a BDAT and end its transaction; its octets are skipped, or the session
        ends if there are more of them than a whole message may have."""
        in_transfer = self.chunked is not None
        if in_transfer or refusal is replies.MESSAGE_TOO_BIG:
            self.reset_transaction()  # RFC 3030 3: a refused chunk ends the transaction
        if size > self.config.max_message_size:
            self.close_with(refusal)
            return
        self.skip_octets = size
        self.error(refusal)

    def take_chunk_octets(self) -> None:
        """Feed the octets of the current chunk that have arrived (never more)."""
        chunked = self.chunked
        assert chunked is not None
        n = min(chunked.remaining, len(self.input))
        data = bytes(self.input[:n])
        del self.input[:n]
        chunked.remaining -= n
        chunked.reader.feed(data)
        if not chunked.remaining:
            self._chunk_complete()

    def _chunk_complete(self) -> None:
        chunked = self.chunked
        assert chunked is not None
        if not chunked.last:
            self.respond(replies.Reply(250, "2.0.0", f"Ok: {chunked.chunk_size} octets received"))
            return
        chunked.reader.finish()
        self.chunked = None
        self.data_reader = chunked.reader  # the one end of a message: DATA's
        self.end_of_data()

    def chunks_in_progress(self) -> bool:
        """Whether chunk octets are expected now (the kernel hands them to take_chunk_octets)."""
        return self.chunked is not None and self.chunked.remaining > 0

    def forget_chunks(self) -> None:
        self.chunked = None

    def refuse_mixing(self) -> bool:
        """DATA or RCPT after BDAT began: 503, and the transaction ends (RFC 3030 2)."""
        if self.chunked is None:
            return False
        self.reset_transaction()
        self.error(replies.Reply(503, "5.5.1", "Error: BDAT transaction in progress; "
                                               "DATA or RCPT cannot follow BDAT"))
        return True
