"""The DATA phase: find the end of the message, undo dot-stuffing, spot bad lines.

Only ``<CRLF>.<CRLF>`` ends a message.  A bare LF or bare CR anywhere in the
message is remembered (the message is then refused: SMTP smuggling), and so
is a line longer than the limit.  Work is done on whole chunks with bytes
methods rather than line by line, and the reader never holds more than one
unterminated line (bounded by the line limit) between calls.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import attrs

END_OF_DATA = b"\r\n.\r\n"
MAX_HOPS = 50  # Received fields a message may carry in (Postfix's hopcount_limit): forwarding loops end here
_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")


@attrs.define
class DataProblems:
    """What was wrong with the message body, decided at the end of DATA."""

    bare_line_ending: bool = False
    line_too_long: bool = False
    too_big: bool = False
    hops: int = 0  # Received fields in the message header: more than MAX_HOPS is a mail loop

    @property
    def too_many_hops(self) -> bool:
        return self.hops > MAX_HOPS


class DataReader:
    """Consumes DATA bytes; calls ``sink`` with unstuffed content.

    ``feed`` returns None while the message continues, or the bytes that
    followed the terminating dot (pipelined commands) once it has ended.
    """

    def __init__(self, sink: Callable[[bytes], None], max_size: int, max_line_length: int,
                 normalize_line_endings: bool = False) -> None:
        self._sink = sink
        self._normalize = normalize_line_endings
        self._max_size = max_size
        self._max_line_length = max_line_length
        self._pending = b""  # the unterminated tail; always starts at a line start
        self._in_header = True
        self.size = 0
        self.problems = DataProblems()

    def feed(self, data: bytes) -> bytes | None:
        buffer = self._pending + data
        prefixed = b"\r\n" + buffer
        end = prefixed.find(END_OF_DATA)
        if end >= 0:
            self._consume(buffer[:end])
            self._pending = b""
            return buffer[end + 3 :]
        last = buffer.rfind(b"\r\n")
        if last >= 0:
            self._consume(buffer[: last + 2])
            buffer = buffer[last + 2 :]
        self._pending = self._bounded(buffer)
        return None

    def _bounded(self, tail: bytes) -> bytes:
        """Keep an unterminated line only up to the limit; drop the excess."""
        limit = self._max_line_length + 2
        if len(tail) <= limit:
            return tail
        self.problems.line_too_long = True
        # keep a short tail, enough to see a CRLF or terminator that spans chunks
        return b"X" + tail[-4:]

    def _consume(self, segment: bytes) -> None:
        """Check and pass on complete lines (``segment`` ends with CRLF or is empty)."""
        if not segment:
            return
        crlf = segment.count(b"\r\n")
        bare = segment.count(b"\n") != crlf or segment.count(b"\r") != crlf
        if bare and not self._normalize:
            self.problems.bare_line_ending = True
        if len(segment) > self._max_line_length and \
                max(map(len, segment.split(b"\r\n"))) > self._max_line_length:
            self.problems.line_too_long = True
        segment = self._unstuff(segment)
        if bare and self._normalize:  # after unstuffing: only CRLF lines were dot-stuffed
            segment = _LINE_ENDINGS.sub(b"\r\n", segment)
        if self._in_header:
            self._count_hops(segment)
        self.size += len(segment)
        if self.size > self._max_size:
            self.problems.too_big = True
        if not (self.problems.too_big or self.problems.bare_line_ending or self.problems.line_too_long):
            self._sink(segment)

    def _unstuff(self, segment: bytes) -> bytes:
        """Undo dot-stuffing (RFC 5321 4.5.2): DATA lines that begin with a dot got one more."""
        if segment.startswith(b"."):
            segment = segment[1:]
        return segment.replace(b"\r\n.", b"\r\n")

    def _count_hops(self, segment: bytes) -> None:
        """Count Received fields until the header ends (the first empty line)."""
        for line in segment.split(b"\r\n")[:-1]:
            if not line:
                self._in_header = False
                return
            if line[:9].lower() == b"received:":
                self.problems.hops += 1
