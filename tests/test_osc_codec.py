"""The OSC decoder/encoder against golden datagrams from real clients (liblo's oscsend), and hostile bytes."""

from __future__ import annotations

import contextlib
import math
import random
import struct
from pathlib import Path

import pytest

from soundctm_rt.daemon.clock import ntp_to_unix, unix_to_ntp
from soundctm_rt.daemon.osc import (
    IMMEDIATELY,
    OscError,
    decode_message,
    decode_packet,
    encode_bundle,
    encode_message,
    is_immediate,
)

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


def test_each_message_carries_its_bundles_time_tag() -> None:
    a, b, c = encode_message("/a"), encode_message("/b"), encode_message("/c")
    t, later = 3_900_000_000 << 32, (3_900_000_000 << 32) + (1 << 31)  # 2023-08-01, and half a second after
    got = decode_packet(encode_bundle(t, a, encode_bundle(IMMEDIATELY, b), encode_bundle(later, c)))
    assert [(m.address, m.timetag) for m in got] == [("/a", t), ("/b", t), ("/c", later)]
    assert decode_message(a).timetag == IMMEDIATELY and decode_packet(a)[0].timetag == IMMEDIATELY
    assert decode_packet(encode_bundle(0, a))[0].timetag == IMMEDIATELY  # 0 is read as "immediately" too
    assert is_immediate(0) and is_immediate(1) and not is_immediate(t)


def test_golden_sclang_bundle_with_latency() -> None:
    """sclang's `NetAddr.sendBundle(0.25, ...)`, captured at Unix time 1796135501.3911: tagged 0.25 s ahead."""
    got = decode_packet(golden("sclang_bundle_0.25s"))
    assert [(m.address, m.args[:1]) for m in got] == [("/soundctm/trigger", ("kick drum",)), ("/soundctm/stop", ())]
    assert got[0].timetag == got[1].timetag == struct.unpack_from(">Q", golden("sclang_bundle_0.25s"), 8)[0]
    ahead = ntp_to_unix(got[0].timetag, now=1796135501.3911) - 1796135501.3911
    assert 0.24 < ahead < 0.251


def test_ntp_time_tags_match_python_osc_and_cross_the_2036_wrap() -> None:
    from pythonosc.osc_bundle_builder import OscBundleBuilder
    from pythonosc.osc_message_builder import OscMessageBuilder

    t = 1_796_135_501.123456
    b = OscBundleBuilder(t)
    b.add_content(OscMessageBuilder("/x").build())
    (m,) = decode_packet(b.build().dgram)
    assert abs(ntp_to_unix(m.timetag, now=t) - t) < 1e-6
    assert unix_to_ntp(t) >> 32 == m.timetag >> 32
    wrap = 2_085_978_496.0  # 2036-02-07T06:28:16Z: NTP seconds wrap to 0
    for u in (wrap - 0.5, wrap + 0.5):
        assert abs(ntp_to_unix(unix_to_ntp(u), now=wrap) - u) < 1e-6


@pytest.mark.parametrize(
    "args", [("kick", 1, 2.5), ("x", 2**40, -(2**31) + 1, True, False, None, b"ab\x00"), (), ("\u00e9t\u00e9 rain",)]
)
def test_the_clients_python_osc_messages_are_what_the_daemon_would_encode(args) -> None:
    """The client helper builds with python-osc; for the types both write, the bytes agree with ours."""
    from soundctm_rt.daemon.client import build_message

    data = build_message("/soundctm/generate", *args).dgram
    assert data == encode_message("/soundctm/generate", *args)
    assert decode_packet(data)[0].args == args


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
