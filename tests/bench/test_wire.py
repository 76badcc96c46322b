"""The loopback capture's parser: HTTP/2 frames and gRPC messages rebuilt from TCP segments."""

from __future__ import annotations

import itertools
import struct
from dataclasses import replace

from bench.wire import HTTP2_PADDED, Packet, parse_packet, sent_messages

SETTINGS, HEADERS, DATA = 0x4, 0x1, 0x0


def frame(kind: int, stream_id: int, body: bytes, flags: int = 0) -> bytes:
    return len(body).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + body


def grpc_message(data: bytes) -> bytes:
    return b"\0" + len(data).to_bytes(4, "big") + data


def segments(stream: bytes, cuts: list[int], isn: int, client_port: int) -> list[Packet]:
    """The server's SYN-ACK (sequence number isn), then the stream cut into packets at the given
    offsets; packet i of the stream is stamped 1000 * (i + 1)."""
    bounds = [0, *cuts, len(stream)]
    return [Packet(0, client_port, isn, b"", is_syn=True)] + [
        Packet(1000 * (i + 1), client_port, (isn + 1 + start) % (1 << 32), stream[start:end])
        for i, (start, end) in enumerate(itertools.pairwise(bounds))
    ]


def test_messages_are_rebuilt_across_packets_frames_and_streams() -> None:
    first = frame(DATA, 1, grpc_message(b"alpha"))
    padded_body = bytes([3]) + grpc_message(b"beta") + grpc_message(b"gamma") + b"\0\0\0"
    stream = (
        frame(SETTINGS, 0, b"")
        + frame(HEADERS, 1, b"\x88")
        + first
        + frame(DATA, 3, padded_body, flags=HTTP2_PADDED)
        + frame(DATA, 1, grpc_message(b"delta")[:4])  # one message split over two DATA frames
        + frame(DATA, 1, grpc_message(b"delta")[4:])
    )
    alpha_end = len(frame(SETTINGS, 0, b"") + frame(HEADERS, 1, b"\x88")) + len(first)
    # Cut inside "alpha" (it is sent by the second packet), right after it and after "beta"; the
    # sequence numbers wrap around. The packets arrive out of order, the second is sent again
    # later (a retransmission: its first copy's time counts), and one sent later repeats the
    # third's end and brings new bytes (kept, but "gamma" ends in the fourth packet's part).
    syn, *packets = segments(stream, [alpha_end - 3, alpha_end, alpha_end + 20], (1 << 32) - 5, 40000)
    resent = replace(packets[1], realtime_ns=9000)
    overlapping = replace(
        packets[2], realtime_ns=9500, seq=packets[2].seq + 5, payload=stream[alpha_end + 5 : alpha_end + 25]
    )
    captured = [packets[2], syn, packets[0], packets[1], resent, overlapping, packets[3]]
    other = segments(frame(DATA, 1, grpc_message(b"other")), [], 7, 40001)
    found = sorted(sent_messages(captured + other), key=lambda m: m[1])
    assert found == sorted(
        [(2000, b"alpha"), (3000, b"beta"), (4000, b"gamma"), (4000, b"delta"), (1000, b"other")],
        key=lambda m: m[1],
    )


def test_a_connection_opened_before_the_capture_or_with_a_gap_is_not_misread() -> None:
    stream = frame(DATA, 1, grpc_message(b"first")) + frame(DATA, 1, grpc_message(b"second"))
    syn, *packets = segments(stream, [len(stream) - 4], 100, 40000)
    assert sent_messages(packets) == []  # no SYN-ACK: opened before the capture started
    assert sent_messages([syn, packets[1]]) == []  # the first packet was dropped
    dropped_middle = segments(stream, [len(stream) - 8, len(stream) - 4], 100, 40000)
    del dropped_middle[2]
    assert sent_messages(dropped_middle) == [(1000, b"first")]


def test_a_message_cut_off_by_the_capture_end_is_left_out() -> None:
    stream = frame(DATA, 1, grpc_message(b"whole")) + frame(DATA, 1, grpc_message(b"partial"))[:-2]
    assert sent_messages(segments(stream, [], 0, 40000)) == [(1000, b"whole")]


def test_only_tcp_payloads_and_the_syn_ack_from_the_server_port_are_kept() -> None:
    def ethernet_ipv4_tcp(source_port: int, payload: bytes, protocol: int = 6, flags: int = 0x18) -> bytes:
        ip = bytes([0x45, 0]) + (40 + len(payload)).to_bytes(2, "big") + bytes([0, 0, 0, 0, 64, protocol]) + bytes(10)
        tcp = struct.pack("!HHIIBB", source_port, 40000, 12345, 0, 5 << 4, flags) + bytes(6)
        return bytes(14) + ip + tcp + payload + bytes(6)  # Ethernet padding after the IP packet

    assert parse_packet(ethernet_ipv4_tcp(50051, b"data"), 50051) == Packet(0, 40000, 12345, b"data")
    assert parse_packet(ethernet_ipv4_tcp(50051, b"", flags=0x12), 50051) == Packet(0, 40000, 12345, b"", True)
    assert parse_packet(ethernet_ipv4_tcp(50052, b"data"), 50051) is None
    assert parse_packet(ethernet_ipv4_tcp(50051, b""), 50051) is None
    assert parse_packet(ethernet_ipv4_tcp(50051, b"data", protocol=17), 50051) is None
