"""A packet capture on a netns LAN's links, and a search of what it caught for tensor bytes.

``tcpdump`` is often not installed, and all a test needs is the bytes on the wire: an ``AF_PACKET``
socket per interface (root only) sees every frame that crosses it, in both directions. The bridge
side of a host's veth (:meth:`netns.Lan.veth`) carries everything that host sends and receives.

:func:`float_pairs_found` counts places where two consecutive float32 values of a tensor appear
verbatim in the capture, at any byte offset: a crop of a frame shipped in plaintext shows up as
thousands of them, while encrypted traffic matches a random 64-bit needle about never.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from collections.abc import Iterable, Sequence
from types import TracebackType

import numpy as np

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = 33


class Capture:
    """Every frame crossing ``ifaces`` while the context is open (``limit`` bytes at most, kept)."""

    def __init__(self, ifaces: Sequence[str], *, limit: int = 1 << 30) -> None:
        self.ifaces = list(ifaces)
        self.limit = limit
        self._chunks: list[bytes] = []
        self.bytes = 0
        self.packets = 0
        self.dropped = 0  # by the kernel (receive buffer full), summed over the sockets
        self.truncated = False  # the limit was reached and later frames were not kept
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Capture:
        for iface in self.ifaces:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
            s.bind((iface, 0))
            s.setblocking(False)
            self._socks.append(s)
        self._thread = threading.Thread(target=self._read, name="capture", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        buf = bytearray(1 << 18)  # frames of up to 64 KiB arrive whole with GSO/GRO on veths
        while not self._stop.is_set():
            ready, _, _ = select.select(self._socks, [], [], 0.1)
            for s in ready:
                while True:
                    try:
                        n = s.recv_into(buf)
                    except BlockingIOError:
                        break
                    self.packets += 1
                    if self.bytes + n > self.limit:
                        self.truncated = True
                        continue
                    self._chunks.append(bytes(buf[:n]))
                    self.bytes += n

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for s in self._socks:
            received, dropped = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
            self.dropped += dropped
            s.close()

    def data(self) -> bytes:
        return b"".join(self._chunks)

    def __repr__(self) -> str:
        return (f"Capture({self.ifaces}: {self.packets} frames, {self.bytes / 1e6:.1f} MB kept, "
                f"{self.dropped} dropped by the kernel{', truncated' if self.truncated else ''})")


def float_pairs(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """Sorted unique 64-bit values of every two consecutive float32s of ``arrays``, in NCHW and NHWC order."""
    keys = []
    for a in arrays:
        a = np.asarray(a, dtype=np.float32)
        orders = [a] if a.ndim != 4 else [a, a.transpose(0, 2, 3, 1)]
        for o in orders:
            u = np.ascontiguousarray(o).reshape(-1).view(np.uint32).astype(np.uint64)
            keys.append(u[:-1] | (u[1:] << np.uint64(32)))  # little-endian: the first float is the low half
    return np.unique(np.concatenate(keys))


def float_pairs_found(data: bytes, needles: np.ndarray) -> int:
    """How many byte offsets of ``data`` start 8 bytes equal to one of ``needles`` (:func:`float_pairs`)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    found = 0
    for shift in range(8):
        seg = raw[shift:]
        vals = seg[: len(seg) // 8 * 8].view("<u8")
        if not len(vals):
            continue
        at = np.searchsorted(needles, vals).clip(max=len(needles) - 1)
        found += int(np.count_nonzero(needles[at] == vals))
    return found
