"""When a server's gRPC messages leave it: kernel timestamps of its packets on the loopback device.

`goodspeed bench service` times a chunk from the end of its engine step to the moment the packet
carrying its last byte passes the loopback interface. The server's own clock stops at handing the
message to gRPC, and a client's read also counts the client's wait for a CPU; the packet's
timestamp is neither. Capturing needs CAP_NET_RAW (root); without it `capture` raises
PermissionError and the bench reports the other two figures.

A capture process records the TCP payloads the server's port sends (outgoing copies only: the
loopback device shows each packet twice); `sent_messages` rebuilds each connection's byte
stream, walks its HTTP/2 frames and splits the DATA of every stream into gRPC's length-prefixed
messages. The connections must open after the capture starts, so that their streams are read
from the first frame.
"""

from __future__ import annotations

import bisect
import multiprocessing
import multiprocessing.connection
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35  # Linux; the kernel's CLOCK_REALTIME when the packet was captured
PACKET_OUTGOING = 4
ETHERNET_HEADER_BYTES = 14
IP_PROTO_TCP = 6
HTTP2_FRAME_HEADER_BYTES = 9
HTTP2_DATA = 0x0
HTTP2_PADDED = 0x8
GRPC_PREFIX_BYTES = 5  # compressed flag, then the message length (big endian)


@dataclass(frozen=True, slots=True)
class Packet:
    realtime_ns: int
    client_port: int
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class SentMessage:
    monotonic_ns: int  # when the packet carrying its last byte left, on time.monotonic_ns()'s clock
    data: bytes  # the serialized protobuf


@dataclass
class Capture:
    """Filled in when the `capture` block ends."""

    packets: list[Packet] = field(default_factory=list)
    realtime_offset_ns: int = 0  # time.time_ns() - time.monotonic_ns() at the start

    def messages(self) -> list[SentMessage]:
        return [
            SentMessage(realtime_ns - self.realtime_offset_ns, data)
            for realtime_ns, data in sent_messages(self.packets)
        ]


def can_capture() -> bool:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL)).close()
    except (PermissionError, AttributeError):  # AttributeError: no AF_PACKET (not Linux)
        return False
    return True


def parse_packet(frame: bytes, server_port: int) -> tuple[int, int, bytes] | None:
    """(client port, TCP sequence number, payload) of a TCP segment from server_port, else None."""
    ip = frame[ETHERNET_HEADER_BYTES:]
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != IP_PROTO_TCP:
        return None
    tcp = ip[(ip[0] & 0x0F) * 4 :]
    source_port, client_port, seq = struct.unpack("!HHI", tcp[:8])
    payload = tcp[(tcp[12] >> 4) * 4 :]
    if source_port != server_port or not payload:
        return None
    return client_port, seq, bytes(payload)


def _capture_main(server_port: int, stop: Event, results: multiprocessing.connection.Connection) -> None:
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
    except PermissionError as exc:
        results.send(exc)
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind(("lo", 0))
    sock.settimeout(0.1)
    results.send(None)  # ready
    packets: list[Packet] = []
    while not stop.is_set():
        try:
            frame, ancillary, _, address = sock.recvmsg(1 << 17, 64)
        except TimeoutError:
            continue
        parsed = parse_packet(frame, server_port) if address[2] == PACKET_OUTGOING else None
        stamps = [data for level, kind, data in ancillary if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS]
        if parsed is not None and stamps:
            seconds, nanoseconds = struct.unpack("qq", stamps[0][:16])
            packets.append(Packet(seconds * 1_000_000_000 + nanoseconds, *parsed))
    results.send(packets)


@contextmanager
def capture(server_port: int) -> Iterator[Capture]:
    """Records what server_port sends on the loopback device while the block runs."""
    context = multiprocessing.get_context("spawn")  # no fork: the caller may already run gRPC threads
    stop = context.Event()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_capture_main, args=(server_port, stop, sender), daemon=True)
    process.start()
    started = receiver.recv()
    if isinstance(started, PermissionError):
        process.join()
        raise PermissionError(f"capturing packets needs CAP_NET_RAW (root): {started}")
    result = Capture(realtime_offset_ns=time.time_ns() - time.monotonic_ns())
    try:
        yield result
    finally:
        stop.set()
        result.packets = receiver.recv()
        process.join()


def sent_messages(packets: list[Packet]) -> list[tuple[int, bytes]]:
    """(capture time of the packet carrying its last byte, message) for every gRPC message sent."""
    by_connection: dict[int, list[Packet]] = {}
    for packet in packets:
        by_connection.setdefault(packet.client_port, []).append(packet)
    messages: list[tuple[int, bytes]] = []
    for segments in by_connection.values():
        messages += _connection_messages(segments)
    return messages


def _connection_messages(segments: list[Packet]) -> list[tuple[int, bytes]]:
    first_seq = segments[0].seq
    stream = bytearray()
    ends: list[int] = []  # the stream offset each packet ends at, and its time
    times: list[int] = []
    for packet in sorted(segments, key=lambda p: (p.seq - first_seq) % (1 << 32)):
        offset = (packet.seq - first_seq) % (1 << 32)
        if offset < len(stream):
            continue  # a retransmission
        stream += packet.payload
        ends.append(len(stream))
        times.append(packet.realtime_ns)

    def sent_ns(offset: int) -> int:
        return times[bisect.bisect_right(ends, offset)]

    # Each HTTP/2 stream's DATA bytes, and where each of them lies in the connection's bytes.
    data: dict[int, tuple[bytearray, list[int]]] = {}
    position = 0
    while position + HTTP2_FRAME_HEADER_BYTES <= len(stream):
        length = int.from_bytes(stream[position : position + 3], "big")
        kind, flags = stream[position + 3], stream[position + 4]
        stream_id = int.from_bytes(stream[position + 5 : position + 9], "big") & 0x7FFFFFFF
        frame_end = position + HTTP2_FRAME_HEADER_BYTES + length
        if frame_end > len(stream):
            break  # cut off by the end of the capture
        if kind == HTTP2_DATA:
            start, end = position + HTTP2_FRAME_HEADER_BYTES, frame_end
            if flags & HTTP2_PADDED:
                start, end = start + 1, end - stream[start]
            body, offsets = data.setdefault(stream_id, (bytearray(), []))
            body += stream[start:end]
            offsets += range(start, end)
        position = frame_end

    messages = []
    for body, offsets in data.values():
        at = 0
        while at + GRPC_PREFIX_BYTES <= len(body):
            length = int.from_bytes(body[at + 1 : at + GRPC_PREFIX_BYTES], "big")
            last = at + GRPC_PREFIX_BYTES + length
            if last > len(body):
                break
            messages.append((sent_ns(offsets[last - 1]), bytes(body[at + GRPC_PREFIX_BYTES : last])))
            at = last
    return messages
