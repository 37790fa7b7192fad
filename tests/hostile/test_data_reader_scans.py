"""The DATA reader's chunk scans against the line-by-line definition (smuggling).

The reader decides bare CR/LF, long lines, the terminator and dot-stuffing with
a few scans per chunk instead of per line; these tests feed it random messages
built from the dangerous pieces (bare CR, bare LF, ``LF . CR LF``, dots at line
starts, lines at and over the limit) cut at random places, and check every
verdict against a plain reading of RFC 5321 done line by line.
"""

from __future__ import annotations

import random
import re

import pytest

from mailappliance.smtp.data import DataReader, has_bare_line_ending, has_long_line

PIECES = [b"a", b"bc", b".", b"..", b"\r\n", b"\r\n", b"\r\n", b"\r", b"\n", b"\n.", b"\r\n.", b".\r\n",
          b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"Received: x\r\n", b"\r\n\r\n", b"y" * 19, b"z" * 21, b"\x00"]
LIMIT = 20


def reference(stream: bytes, limit: int, normalize: bool) -> tuple[int, bool, bool, bytes, int]:
    """End of data, bare line ending, long line, unstuffed content, hops: line by line."""
    end = (b"\r\n" + stream).find(b"\r\n.\r\n")
    assert end >= 0
    content = stream[:end]
    lines = content.split(b"\r\n")  # the last one is empty: content ends with CRLF (or is empty)
    bare = any(b"\r" in line or b"\n" in line for line in lines)
    too_long = any(len(line) > limit for line in lines)
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    if normalize and bare:
        unstuffed = re.sub(rb"\r\n|\r|\n", b"\r\n", unstuffed)
    hops = 0
    for line in unstuffed.split(b"\r\n"):
        if not line:
            break
        hops += line[:9].lower() == b"received:"
    return end, bare, too_long, unstuffed, hops


def random_message(rng: random.Random) -> bytes:
    body = b"".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 60)))
    return body + b"\r\n.\r\nQUIT\r\n"


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("normalize", [False, True])
def test_random_messages_get_the_line_by_line_verdict(seed: int, normalize: bool) -> None:
    """Bare CR/LF, long lines, the terminator, unstuffing and hop counts match a
    line-by-line reading, however the stream is cut into chunks."""
    rng = random.Random(seed)
    for _ in range(25):
        stream = random_message(rng)
        end, bare, too_long, unstuffed, hops = reference(stream, LIMIT, normalize)
        received: list[bytes] = []
        reader = DataReader(received.append, 10**9, LIMIT, normalize_line_endings=normalize)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randrange(0, 8))))
        rest = None
        for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            rest = reader.feed(stream[start:stop])
            if rest is not None:
                rest += stream[stop:]
                break
        assert rest == stream[end + 3:], stream
        assert reader.problems.line_too_long == too_long, stream
        if not too_long:  # (past an over-long line the reader keeps only a short tail of it)
            assert reader.problems.bare_line_ending == (bare and not normalize), stream
            assert reader.problems.hops == hops, stream
        if not (reader.problems.bare_line_ending or reader.problems.line_too_long):
            assert b"".join(received) == unstuffed, stream
            assert reader.size == len(unstuffed)


def test_bare_line_endings_anywhere_in_a_chunk() -> None:
    """A lone CR or LF is found at the start, the middle and the end of a chunk."""
    good = b"line one\r\nline two\r\n" * 500
    assert not has_bare_line_ending(good)
    for position in (0, 3, len(good) // 2 + 3, len(good) - 2, len(good)):  # never between a CR and its LF
        for intruder in (b"\r", b"\n", b"\n\r"):
            assert has_bare_line_ending(good[:position] + intruder + good[position:]), (position, intruder)


@pytest.mark.parametrize("limit", [1, 2, 7, 998])
def test_long_lines_at_every_offset(limit: int) -> None:
    """A line of limit + 1 octets is found wherever it starts; one of limit octets is fine."""
    filler = b"a\r\n" * 700
    for offset in range(0, 2 * limit + 16):
        for length, expected in ((limit, False), (limit + 1, True)):
            segment = filler[:offset * 3] + b"x" * length + b"\r\n" + filler
            assert has_long_line(segment, limit) is expected, (limit, offset, length)
