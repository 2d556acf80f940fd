"""The OSC decoder/encoder against golden datagrams from real clients (liblo's oscsend), and hostile bytes."""

from __future__ import annotations

import contextlib
import math
import random
import struct
from pathlib import Path

import pytest

from soundctm_rt.daemon.osc import OscError, decode_message, decode_packet, encode_message

FIX = Path(__file__).parent / "fixtures" / "osc"


def golden(name: str) -> bytes:
    return (FIX / f"{name}.bin").read_bytes()


def test_golden_liblo_generate() -> None:
    m = decode_message(golden("liblo_generate_sif"))
    assert m.address == "/soundctm/generate"
    assert m.tags == "sif"
    assert m.args == ("gritty 808 snare", 7, 1.5)


def test_golden_liblo_ping_and_set() -> None:
    assert decode_message(golden("liblo_ping")).args == ()
    m = decode_message(golden("liblo_set_sf"))
    assert m.args == ("gamma", 0.25)


def test_char_and_symbol_tags_keep_later_arguments_aligned() -> None:
    # python-osc skips c and S without consuming them; the int after them would be garbage.
    m = decode_message(golden("liblo_char_symbol"))
    assert m.tags == "cSi"
    assert m.args == ("x", "kick", 3)


@pytest.mark.parametrize(
    "address,args",
    [
        ("/soundctm/ack", (12,)),
        ("/soundctm/done", (3, 11.5, 0.25, 0.37, 20.0)),
        ("/soundctm/fail", ("generate", "busy")),
    ],
)
def test_encode_round_trip(address: str, args: tuple) -> None:
    m = decode_message(encode_message(address, *args))
    assert m.address == address
    assert m.args == pytest.approx(args) if all(isinstance(a, (int, float)) for a in args) else m.args == args


def test_encode_matches_liblo_bytes() -> None:
    assert encode_message("/soundctm/generate", "gritty 808 snare", 7, 1.5) == golden("liblo_generate_sif")
    assert encode_message("/soundctm/ping") == golden("liblo_ping")


def test_bundle_flattens_in_order() -> None:
    a, b = encode_message("/a", 1), encode_message("/b", "x")
    inner = b"#bundle\x00" + struct.pack(">Q", 1) + struct.pack(">i", len(b)) + b
    data = (
        b"#bundle\x00"
        + struct.pack(">Q", 2**40)
        + struct.pack(">i", len(a))
        + a
        + struct.pack(">i", len(inner))
        + inner
    )
    assert [m.address for m in decode_packet(data)] == ["/a", "/b"]


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"soundctm\x00\x00\x00\x00", "address"),
        (b"/a\x00\x00,i\x00\x00\x00\x01", "truncated"),
        (b"/a\x00\x00,s\x00\x00\xff\xfe\x00\x00", "UTF-8"),
        (b"/a\x00\x00,q\x00\x00", "unknown type tag"),
        (b"/a\x00\x00,b\x00\x00\x7f\xff\xff\xff", "blob"),
        (b"/a\x00\x00,[\x00\x00", "without"),
        (b"/a\x00\x00i\x00\x00\x00", "must start with"),
        (b"#bundle\x00" + b"\x00" * 8 + b"\x00\x00\x00\x05abcde", "bundle element"),
    ],
)
def test_malformed_is_refused_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(OscError, match=reason):
        decode_packet(data)


def test_nan_and_inf_decode_as_floats() -> None:
    m = decode_message(b"/a\x00\x00,fI\x00" + struct.pack(">f", math.nan))
    assert math.isnan(m.args[0]) and m.args[1] == math.inf


def test_random_bytes_raise_only_osc_error() -> None:
    rng = random.Random(5)
    seeds = [golden(n) for n in ("liblo_generate_sif", "liblo_set_sf", "liblo_char_symbol")]
    for i in range(20000):
        if i % 2:
            d = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 6)):
                d[rng.randrange(len(d))] = rng.randrange(256)
            d = bytes(d[: rng.randint(0, len(d))])
        else:
            d = (b"/" if i % 4 == 0 else b"") + rng.randbytes(rng.randint(0, 64))
        with contextlib.suppress(OscError):
            decode_packet(d)
