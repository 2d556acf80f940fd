"""A small blocking OSC client for the daemon: what the benches and tests talk through, and a usage example.

It builds what it sends with python-osc (messages, and bundles time-tagged in Unix time, which python-osc writes
as NTP), so every bench and test also checks the daemon's own strict decoder against an independent encoder.
Replies are read with the daemon's decoder (osc.py), which reads the `c`/`S` tags python-osc still misreads."""

from __future__ import annotations

import socket
import time
from typing import Any

from pythonosc.osc_bundle_builder import OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder

from .osc import OscError, decode_packet


def build_message(address: str, *args: Any) -> Any:
    """A python-osc message: int -> i (h beyond int32), float -> f, str -> s, bytes -> b, bool -> T/F, None -> N."""
    b = OscMessageBuilder(address)
    for a in args:
        b.add_arg(a)
    return b.build()


class OscClient:
    """Sends to the daemon from its own UDP port and reads the replies that come back to it.

    Args:
        port: the daemon's port.
        host: the daemon's address.
        bind_port: the local port (0: any); replies arrive here.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", bind_port: int = 0) -> None:
        self.target = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", bind_port))
        self.port = self.sock.getsockname()[1]

    def send(self, address: str, *args: Any) -> None:
        self.sock.sendto(build_message(address, *args).dgram, self.target)

    def send_at(self, t_unix: float, address: str, *args: Any) -> None:
        """Send one message in a bundle time-tagged at Unix time t_unix (scsynth style: it takes effect then)."""
        bundle = OscBundleBuilder(t_unix)  # type: ignore[arg-type]  # annotated int; write_date takes float s
        bundle.add_content(build_message(address, *args))
        self.sock.sendto(bundle.build().dgram, self.target)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendto(data, self.target)

    def recv(self, timeout: float = 5.0) -> tuple[str, tuple[Any, ...]]:
        """The next reply (address, args). Raises TimeoutError."""
        self.sock.settimeout(max(timeout, 1e-3))
        data, _ = self.sock.recvfrom(65536)
        m = decode_packet(data)[0]
        return m.address, m.args

    def expect(
        self, addresses: str | tuple[str, ...], timeout: float = 5.0, match: Any = None
    ) -> tuple[str, tuple[Any, ...]]:
        """Read replies until one with an address in `addresses` (and, if given, `match(args)` true) arrives;
        others are skipped. Raises TimeoutError."""
        if isinstance(addresses, str):
            addresses = (addresses,)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {addresses} within {timeout} s")
            try:
                addr, args = self.recv(left)
            except (OscError, IndexError):
                continue
            if addr in addresses and (match is None or match(args)):
                return addr, args

    def drain(self) -> int:
        """Drop every reply already waiting; returns how many."""
        n = 0
        self.sock.settimeout(0.0)
        try:
            while True:
                self.sock.recvfrom(65536)
                n += 1
        except (BlockingIOError, TimeoutError):
            return n

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        self.send("/soundctm/status")
        _, args = self.expect("/soundctm/status.reply", timeout)
        return dict(zip(args[::2], args[1::2], strict=False))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> OscClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
