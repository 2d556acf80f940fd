"""OSC 1.0 datagrams: a strict decoder for what clients send, an encoder for our replies.

Why our own decoder and not python-osc's `OscMessage`: python-osc skips type tags it does not know (`c`, `S`)
without consuming their bytes, so every following argument is read from the wrong offset; it raises a mix of
exception types on hostile input. This decoder knows every OSC 1.0 tag plus the common 1.1 extensions
(`c` char, `S` symbol, `h`, `d`, `t`, `T`, `F`, `N`, `I`, `m`, `r`, arrays), raises only `OscError` on bad bytes,
never reads past the datagram, and flattens bundles in order, giving each message the time tag of the bundle
around it (the daemon schedules by it; clock.py converts it). Replies are encoded here too, so the bytes are
checked against golden datagrams from liblo and Pure Data in tests/fixtures/osc/.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

MAX_DATAGRAM = 8192  # larger datagrams are refused with /fail (python-osc's default would drop them silently)
MAX_BUNDLE_DEPTH = 8
MAX_ARGS = 128  # bounds the work on hostile input; a /status reply carries about 90
BUNDLE_TAG = b"#bundle\x00"
IMMEDIATELY = 1  # the OSC 1.0 time tag meaning "now" (63 zero bits, then a one); 0 is read the same way


class OscError(ValueError):
    """A datagram that is not valid OSC, with the reason."""


@dataclass(frozen=True)
class Message:
    """One decoded message.

    Attributes:
        address: the OSC address.
        args: the arguments, decoded by their type tags.
        tags: the type tags without the comma.
        timetag: the NTP time tag (64-bit fixed point: seconds since 1900 in the high 32 bits) of the bundle
            that carried it; IMMEDIATELY for a message sent outside a bundle.
    """

    address: str
    args: tuple[Any, ...]
    tags: str
    timetag: int = IMMEDIATELY


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def _read_string(data: bytes, i: int, what: str) -> tuple[str, int]:
    end = data.find(b"\x00", i)
    if end < 0:
        raise OscError(f"{what} is not NUL-terminated")
    raw = data[i:end]
    nxt = _pad4(end + 1)
    if nxt > len(data):
        raise OscError(f"{what} padding runs past the end of the datagram")
    try:
        return raw.decode("utf-8"), nxt
    except UnicodeDecodeError as e:
        raise OscError(f"{what} is not UTF-8 (byte {e.start})") from None


def _need(data: bytes, i: int, n: int, what: str) -> None:
    if i + n > len(data):
        raise OscError(f"{what} argument truncated")


def decode_message(data: bytes) -> Message:
    """Decode one OSC message. Raises OscError with a short reason."""
    if not data.startswith(b"/"):
        raise OscError("address must start with '/'")
    address, i = _read_string(data, 0, "address")
    if i >= len(data):
        return Message(address, (), "")  # OSC 1.0 allows a message without a type tag string
    if data[i : i + 1] != b",":
        raise OscError("type tag string must start with ','")
    tags, i = _read_string(data, i, "type tags")
    tags = tags[1:]
    if len(tags) > MAX_ARGS:
        raise OscError(f"too many arguments ({len(tags)} > {MAX_ARGS})")
    args: list[Any] = []
    stack: list[list[Any]] = []
    cur = args
    for t in tags:
        if t == "i":
            _need(data, i, 4, "int")
            cur.append(struct.unpack_from(">i", data, i)[0])
            i += 4
        elif t == "f":
            _need(data, i, 4, "float")
            cur.append(struct.unpack_from(">f", data, i)[0])
            i += 4
        elif t in "sS":
            s, i = _read_string(data, i, "string")
            cur.append(s)
        elif t == "b":
            _need(data, i, 4, "blob")
            n = struct.unpack_from(">i", data, i)[0]
            if n < 0 or i + 4 + n > len(data):
                raise OscError("blob size runs past the end of the datagram")
            cur.append(bytes(data[i + 4 : i + 4 + n]))
            i += 4 + _pad4(n)
        elif t == "h":
            _need(data, i, 8, "int64")
            cur.append(struct.unpack_from(">q", data, i)[0])
            i += 8
        elif t == "d":
            _need(data, i, 8, "double")
            cur.append(struct.unpack_from(">d", data, i)[0])
            i += 8
        elif t == "t":
            _need(data, i, 8, "timetag")
            cur.append(struct.unpack_from(">Q", data, i)[0])
            i += 8
        elif t == "c":
            _need(data, i, 4, "char")
            code = struct.unpack_from(">I", data, i)[0]
            try:
                cur.append(chr(code))
            except (ValueError, OverflowError):
                raise OscError("char argument out of range") from None
            i += 4
        elif t in "mr":
            _need(data, i, 4, "midi/rgba")
            cur.append(bytes(data[i : i + 4]))
            i += 4
        elif t == "T":
            cur.append(True)
        elif t == "F":
            cur.append(False)
        elif t == "N":
            cur.append(None)
        elif t == "I":
            cur.append(math.inf)
        elif t == "[":
            if len(stack) >= 4:
                raise OscError("arrays nested too deep")
            stack.append(cur)
            new: list[Any] = []
            cur.append(new)
            cur = new
        elif t == "]":
            if not stack:
                raise OscError("']' without '[' in type tags")
            cur = stack.pop()
        else:
            raise OscError(f"unknown type tag {t!r}")
    if stack:
        raise OscError("'[' without ']' in type tags")
    return Message(address, tuple(args), tags)


def is_immediate(timetag: int) -> bool:
    """Whether a time tag means "now" (1, or 0 as some clients send it)."""
    return timetag <= IMMEDIATELY


def decode_packet(data: bytes, depth: int = 0, timetag: int = IMMEDIATELY) -> list[Message]:
    """Decode a message or a bundle, flattened in order. Raises OscError.

    Each message carries the time tag of the innermost bundle that has one; a nested bundle tagged
    "immediately", or earlier than the bundle around it (OSC 1.0 requires later or equal), takes the outer tag.
    """
    if data.startswith(BUNDLE_TAG):
        if depth >= MAX_BUNDLE_DEPTH:
            raise OscError("bundles nested too deep")
        if len(data) < 16:
            raise OscError("bundle truncated")
        tag = max(timetag, struct.unpack_from(">Q", data, 8)[0])
        out: list[Message] = []
        i = 16  # '#bundle\0' + 8-byte timetag
        while i < len(data):
            _need(data, i, 4, "bundle element size")
            n = struct.unpack_from(">i", data, i)[0]
            if n <= 0 or n % 4 or i + 4 + n > len(data):
                raise OscError("bundle element size is invalid")
            out.extend(decode_packet(data[i + 4 : i + 4 + n], depth + 1, tag))
            i += 4 + n
        return out
    m = decode_message(data)
    return [m if timetag == IMMEDIATELY else Message(m.address, m.args, m.tags, timetag)]


def peek_address(data: bytes) -> str | None:
    """The address of a datagram that failed to decode, if it has a readable one (for the /fail reply)."""
    if not data.startswith(b"/"):
        return None
    end = data.find(b"\x00", 0, 256)
    if end < 0:
        return None
    try:
        return data[:end].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _enc_string(s: str) -> bytes:
    b = s.encode("utf-8") + b"\x00"
    return b + b"\x00" * (_pad4(len(b)) - len(b))


def encode_message(address: str, *args: Any) -> bytes:
    """Encode a message; int -> i (h if out of int32 range), float -> f, str -> s, bytes -> b, bool -> T/F."""
    tags = ","
    body = b""
    for a in args:
        if isinstance(a, bool):
            tags += "T" if a else "F"
        elif isinstance(a, int):
            if -(2**31) <= a < 2**31:
                tags += "i"
                body += struct.pack(">i", a)
            else:
                tags += "h"
                body += struct.pack(">q", a)
        elif isinstance(a, float):
            tags += "f"
            body += struct.pack(">f", a)
        elif isinstance(a, str):
            tags += "s"
            body += _enc_string(a)
        elif isinstance(a, (bytes, bytearray)):
            tags += "b"
            body += struct.pack(">i", len(a)) + bytes(a) + b"\x00" * (_pad4(len(a)) - len(a))
        elif a is None:
            tags += "N"
        else:
            raise TypeError(f"cannot encode {type(a).__name__} as an OSC argument")
    return _enc_string(address) + _enc_string(tags) + body


def encode_bundle(timetag: int, *elements: bytes) -> bytes:
    """Encode a bundle of encoded messages (or bundles) with an NTP time tag (clock.unix_to_ntp makes one)."""
    return BUNDLE_TAG + struct.pack(">Q", timetag) + b"".join(struct.pack(">i", len(e)) + e for e in elements)
