"""When a server's gRPC messages leave it: kernel timestamps of its packets on the loopback device.

`goodspeed bench service` times a chunk from the end of its engine step to the moment the packet
carrying its last byte passes the loopback interface. The server's own clock stops at handing the
message to gRPC, and a client's read also counts the client's wait for a CPU; the packet's
timestamp is neither. Capturing needs CAP_NET_RAW (root): the bench checks `can_capture` first
and, without it, reports the other two figures.

A capture process records the TCP payloads the server's port sends (outgoing copies only: the
loopback device shows each packet twice); `sent_messages` rebuilds each connection's byte
stream, walks its HTTP/2 frames and splits the DATA of every stream into gRPC's length-prefixed
messages. Only connections opened after the capture started are read (their byte stream must
be read from the first frame on); a packet the capture dropped ends its connection's reading.
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
from dataclasses import dataclass, field, replace
from multiprocessing.synchronize import Event

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35  # Linux; the kernel's CLOCK_REALTIME when the packet was captured
SO_RCVBUFFORCE = 33  # Linux; SO_RCVBUF past rmem_max, for CAP_NET_ADMIN
PACKET_OUTGOING = 4
ETHERNET_HEADER_BYTES = 14
IP_PROTO_TCP = 6
TCP_SYN = 0x02
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
    is_syn: bool = False  # the server's SYN-ACK: payload bytes start at seq + 1


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
    except (OSError, AttributeError):  # no permission, no packet sockets here; AttributeError: not Linux
        return False
    return True


def parse_packet(frame: bytes, server_port: int) -> Packet | None:
    """A TCP segment from server_port with a payload, or its SYN-ACK (timestamp left 0); else None."""
    ip = frame[ETHERNET_HEADER_BYTES:]
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != IP_PROTO_TCP:
        return None
    ip = ip[: int.from_bytes(ip[2:4], "big")]  # the IP total length: the frame may carry padding
    tcp = ip[(ip[0] & 0x0F) * 4 :]
    source_port, client_port, seq = struct.unpack("!HHI", tcp[:8])
    payload, is_syn = bytes(tcp[(tcp[12] >> 4) * 4 :]), bool(tcp[13] & TCP_SYN)
    if source_port != server_port or not (payload or is_syn):
        return None
    return Packet(0, client_port, seq, payload, is_syn)


def _capture_main(server_port: int, stop: Event, results: multiprocessing.connection.Connection) -> None:
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
        # Root may pass rmem_max; the loop below reads every loopback packet, so give it room.
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.bind(("lo", 0))
    except OSError as exc:
        results.send(exc)
        return
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
            packets.append(replace(parsed, realtime_ns=seconds * 1_000_000_000 + nanoseconds))
    results.send(packets)


@contextmanager
def capture(server_port: int) -> Iterator[Capture]:
    """Records what server_port sends on the loopback device while the block runs.

    Raises PermissionError without CAP_NET_RAW, RuntimeError if the capture process dies."""
    context = multiprocessing.get_context("spawn")  # no fork: the caller may already run gRPC threads
    stop = context.Event()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_capture_main, args=(server_port, stop, sender), daemon=True)
    process.start()
    sender.close()  # only the child holds it now: its death shows as end-of-file here

    def answer() -> object:
        try:
            return receiver.recv()
        except EOFError:
            process.join()
            raise RuntimeError(f"the capture process exited (exit code {process.exitcode})") from None

    started = answer()
    if isinstance(started, OSError):
        process.join()
        raise PermissionError(f"capturing packets on the loopback device failed (needs CAP_NET_RAW): {started}")
    result = Capture(realtime_offset_ns=time.time_ns() - time.monotonic_ns())
    try:
        yield result
    finally:
        stop.set()
        packets = answer()
        process.join()
        result.packets = packets if isinstance(packets, list) else []


def sent_messages(packets: list[Packet]) -> list[tuple[int, bytes]]:
    """(capture time of the packet carrying its last byte, message) for every gRPC message sent on
    the connections whose opening (the server's SYN-ACK) was captured."""
    by_connection: dict[int, list[Packet]] = {}
    for packet in packets:
        by_connection.setdefault(packet.client_port, []).append(packet)
    messages: list[tuple[int, bytes]] = []
    for segments in by_connection.values():
        messages += _connection_messages(segments)
    return messages


def _connection_messages(segments: list[Packet]) -> list[tuple[int, bytes]]:
    syn = next((p for p in segments if p.is_syn), None)
    if syn is None:
        return []  # opened before the capture: its bytes cannot be read from a frame boundary
    first_seq = (syn.seq + 1) % (1 << 32)
    stream = bytearray()
    ends: list[int] = []  # the stream offset each packet ends at, and its time
    times: list[int] = []
    for packet in sorted(segments, key=lambda p: ((p.seq - first_seq) % (1 << 32), p.realtime_ns)):
        offset = (packet.seq - first_seq) % (1 << 32)
        if packet.is_syn or offset + len(packet.payload) <= len(stream):
            continue  # nothing new: a retransmission
        if offset > len(stream):
            break  # a gap (the capture dropped a packet): what follows cannot be placed
        stream += packet.payload[len(stream) - offset :]
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
