"""POP3 answers that can be large, as chunk iterators the session kernel streams.

Messages are read from their file in ``CHUNK_SIZE`` blocks on the reactor
thread, dot-stuffed across block boundaries (RFC 1939 section 3), and
terminated; LIST and UIDL listings of big mailboxes come out a chunk of lines
at a time.  Nothing here builds a whole answer in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

CHUNK_SIZE = 64 * 1024


def read_blocks(file: BinaryIO) -> Iterator[bytes]:
    """The whole message, in ``CHUNK_SIZE`` blocks (RETR)."""
    while block := file.read(CHUNK_SIZE):
        yield block


def read_top(file: BinaryIO, body_lines: int) -> Iterator[bytes]:
    """The header, the blank line and the first ``body_lines`` body lines (TOP)."""
    in_header, at_line_start, remaining = True, True, body_lines
    pending: list[bytes] = []
    size = 0
    while True:
        if not in_header and remaining <= 0:
            break
        line = file.readline(CHUNK_SIZE)
        if not line:
            break
        complete = line.endswith(b"\n")
        if in_header:
            if at_line_start and line in (b"\r\n", b"\n"):
                in_header = False
        elif complete:
            remaining -= 1
        at_line_start = complete
        pending.append(line)
        size += len(line)
        if size >= CHUNK_SIZE:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


def message_answer(status: bytes, file: BinaryIO, reader: Callable[[BinaryIO], Iterator[bytes]]) -> Iterator[bytes]:
    """Status line, dot-stuffed content, terminator; the status goes out with the
    first block (one segment for a small message: no delayed-ACK stall).
    The file is closed when the answer ends or is abandoned."""
    try:
        at_line_start, last_two, sent_any = True, b"", False
        prefix = status
        for block in reader(file):
            if at_line_start and block.startswith(b"."):
                block = b"." + block
            block = block.replace(b"\n.", b"\n..")
            at_line_start = block.endswith(b"\n")
            last_two = (last_two + block)[-2:]
            sent_any = True
            yield prefix + block
            prefix = b""
        yield prefix + (b"\r\n.\r\n" if sent_any and last_two != b"\r\n" else b".\r\n")
    finally:
        file.close()


def listing(status: str, lines: Iterable[str]) -> Iterator[bytes]:
    """A multi-line answer whose lines never start with '.' (LIST, UIDL), in chunks."""
    pending = [f"+OK {status}\r\n" if status else "+OK\r\n"]
    size = 0
    for line in lines:
        pending.append(line + "\r\n")
        size += len(line) + 2
        if size >= CHUNK_SIZE:
            yield "".join(pending).encode()
            pending, size = [], 0
    pending.append(".\r\n")
    yield "".join(pending).encode()
