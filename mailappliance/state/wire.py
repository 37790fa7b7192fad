"""The state socket's frames: what a worker asks the supervisor, and its answer.

A frame is a 4-byte big-endian length, then that many bytes of UTF-8 JSON
(never pickle: a compromised worker must not run code in the supervisor).

- request: ``[id, op, [args...]]``: ``id`` a whole number the client picks
  (replies come back with it, so a late answer after a timeout is simply
  dropped), ``op`` one of :data:`OPS`, ``args`` checked against that op's
  argument kinds before anything runs;
- reply: ``[id, result]``; or ``[id, null, "why"]`` when a well-formed
  request could not be served.

Keys travel as lists of strings; numbers are finite (an infinite limit is
``null``).  Every bound is checked before the JSON is parsed (the length)
or before it is used (the shape): a frame over :data:`MAX_FRAME`, JSON that
does not parse, or a request of the wrong shape is a :class:`FrameError`,
and whoever receives it drops the connection.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import Any

MAX_FRAME = 64 * 1024  # bytes of one request or reply
MAX_KEY_PARTS = 8  # a kind and its values
MAX_TEXT = 1024  # characters of one key part or lock owner
MAX_KEYS = 64  # keys in one marks() request
MAX_KEEP = 400_000  # events count() keeps per key: [auth] *_lock_after (at most 100,000) times 4
_LENGTH = struct.Struct(">I")


class FrameError(Exception):
    """The peer broke the format or a bound: drop the connection."""


def frame(message: object) -> bytes:
    """``message`` as one frame (compact JSON, finite numbers only)."""
    body = _ENCODER.encode(message).encode()
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes is over {MAX_FRAME}")
    return _LENGTH.pack(len(body)) + body


INCOMPLETE = object()  # what FrameReader.next() returns while the next frame is not all there


class FrameReader:
    """The frames of one byte stream: :meth:`feed` what arrives, then :meth:`next` until
    INCOMPLETE.  Bytes already parsed leave the buffer once per feed, not once per frame."""

    __slots__ = ("buffer", "position")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.position = 0

    def feed(self, data: bytes) -> None:
        if self.position:
            del self.buffer[:self.position]
            self.position = 0
        self.buffer += data

    def __len__(self) -> int:
        """Bytes received and not parsed yet."""
        return len(self.buffer) - self.position

    def clear(self) -> None:
        self.buffer = bytearray()
        self.position = 0

    def next(self) -> Any:
        """The next complete frame, parsed, or INCOMPLETE.  Raises FrameError on a frame
        over MAX_FRAME (as soon as its length is read, before its bytes are buffered) or
        one that is not UTF-8 JSON."""
        buffer, start = self.buffer, self.position
        if len(buffer) - start < 4:
            return INCOMPLETE
        (size,) = _LENGTH.unpack_from(buffer, start)
        if size > MAX_FRAME:
            raise FrameError(f"frame of {size} bytes is over {MAX_FRAME}")
        end = start + 4 + size
        if len(buffer) < end:
            return INCOMPLETE
        self.position = end
        try:
            return _DECODER.decode(buffer[start + 4:end].decode("utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors; [[[[...
            raise FrameError(f"not JSON: {str(e)[:80]}") from None


def take(buffer: bytearray) -> Any:
    """The first complete frame of ``buffer``, parsed and taken off it, or INCOMPLETE."""
    reader = FrameReader()
    reader.buffer = buffer
    message = reader.next()
    del buffer[:reader.position]
    return message


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number here")


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


# -- argument kinds ---------------------------------------------------------------------


def _key(value: object) -> tuple[str, ...]:
    if (not isinstance(value, list) or not 1 <= len(value) <= MAX_KEY_PARTS
            or not all(isinstance(part, str) and len(part) <= MAX_TEXT for part in value)):
        raise FrameError("a key is a list of 1 to 8 short strings")
    return tuple(value)


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FrameError("not a finite number")
    return float(value)


def _whole(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 2**62:
        raise FrameError("not a whole number")
    return value


def _keep(value: object) -> int:
    keep = _whole(value)
    if not 1 <= keep <= MAX_KEEP:
        raise FrameError(f"keep is 1 to {MAX_KEEP}")
    return keep


def _limit(value: object) -> float:
    return math.inf if value is None else _number(value)


def _text(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise FrameError("not a short string")
    return value


def _keys(value: object) -> list[tuple[str, ...]]:
    if not isinstance(value, list) or len(value) > MAX_KEYS:
        raise FrameError(f"not a list of at most {MAX_KEYS} keys")
    return [_key(item) for item in value]


def _mark_rule(value: object) -> tuple[tuple[str, ...], int, float] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 3:
        raise FrameError("a mark rule is [key, threshold, ttl]")
    return _key(value[0]), _whole(value[1]), _number(value[2])


_Kind = Callable[[object], Any]

# op -> the kinds of its arguments, in order (the StateStore method of the same name)
OPS: dict[str, tuple[_Kind, ...]] = {
    "ping": (),
    "reserve": (_key, _number, _limit, _whole),
    "release": (_key, _whole),
    "total": (_key, _number),
    "count": (_key, _number, _keep, _mark_rule),
    "forget": (_key,),
    "mark": (_key, _number),
    "marks": (_keys,),
    "lock": (_key, _text, _number),
    "refresh": (_key, _text, _number),
    "holds": (_key, _text),
    "unlock": (_key, _text),
    "get_value": (_key,),
    "set_value": (_key, _whole, _number),
    "add_value": (_key, _whole),
}


def request(message: object) -> tuple[int, str, list[Any]]:
    """A parsed request frame checked: (id, op, arguments as their kinds); FrameError otherwise."""
    if not isinstance(message, list) or len(message) != 3:
        raise FrameError("a request is [id, op, args]")
    ident, op, args = message
    ident = _whole(ident)
    kinds = OPS.get(op) if isinstance(op, str) else None
    if kinds is None:
        raise FrameError(f"unknown op {str(op)[:40]!r}")
    if not isinstance(args, list) or len(args) != len(kinds):
        raise FrameError(f"{op} takes {len(kinds)} arguments")
    return ident, op, [kind(arg) for kind, arg in zip(kinds, args, strict=True)]


def reply(message: object) -> tuple[int, object, str | None]:
    """A parsed reply frame checked: (id, result, error or None); FrameError otherwise."""
    if not isinstance(message, list) or len(message) not in (2, 3):
        raise FrameError("a reply is [id, result] or [id, null, why]")
    ident = _whole(message[0])
    if len(message) == 3:
        return ident, None, str(message[2])[:200]
    return ident, message[1], None
