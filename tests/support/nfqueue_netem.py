"""Delays and drops the packets that a network namespace sends, like `tc qdisc ... netem`, for kernels built
without sch_netem (the test machine's has no CONFIG_NET_SCH_NETEM and cannot load modules).

tests.support.netns starts this inside a namespace, then adds `iptables -A OUTPUT -o eth0 -j NFQUEUE` there. The
kernel then holds every packet that the namespace sends and passes its id to this process (copy mode "meta": the
payload never leaves the kernel, so checksums and GSO are untouched). The process drops each packet with
probability --loss-percent and tells the kernel to send the others --delay-ms after it got them, in order.

    ip netns exec NS python -m tests.support.nfqueue_netem --delay-ms 200 --loss-percent 5

It prints "ready" once bound to the queue. On SIGTERM or SIGINT it releases every packet it holds, then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import socket
import struct
from collections.abc import Iterator

QUEUE_NUMBER = 0
"""The NFQUEUE number to send packets to. Each network namespace has its own queues, so one number fits all."""

# From <linux/netlink.h>, <linux/netfilter/nfnetlink.h> and <linux/netfilter/nfnetlink_queue.h>.
_NETLINK_NETFILTER = 12
_SOL_NETLINK = 270
_NETLINK_NO_ENOBUFS = 5
_SO_RCVBUFFORCE = 33
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLA_TYPE_MASK = 0x3FFF
_NFNL_SUBSYS_QUEUE = 3
_NFQNL_MSG_PACKET = _NFNL_SUBSYS_QUEUE << 8 | 0
_NFQNL_MSG_VERDICT = _NFNL_SUBSYS_QUEUE << 8 | 1
_NFQNL_MSG_CONFIG = _NFNL_SUBSYS_QUEUE << 8 | 2
_NFQNL_MSG_VERDICT_BATCH = _NFNL_SUBSYS_QUEUE << 8 | 3
_NFQA_PACKET_HDR = 1
_NFQA_VERDICT_HDR = 2
_NFQA_CFG_CMD = 1
_NFQA_CFG_PARAMS = 2
_NFQA_CFG_QUEUE_MAXLEN = 3
_NFQA_CFG_MASK = 4
_NFQA_CFG_FLAGS = 5
_NFQA_CFG_F_GSO = 4
_NFQNL_CFG_CMD_BIND = 1
_NFQNL_COPY_META = 1
_NF_DROP = 0
_NF_ACCEPT = 1

_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_NFGEN_HEADER = struct.Struct("=BBH")  # family, version, queue number (big endian, packed by the caller)
_NLATTR_HEADER = struct.Struct("=HH")  # length, type
# The kernel's default of 1024 held packets would cap a 200 ms delay at about 5000 packets a second.
_QUEUE_MAX_PACKETS = 65536
_RECEIVE_BUFFER_BYTES = 8 * 1024 * 1024


def _align(length: int) -> int:
    return (length + 3) & ~3


def _attribute(kind: int, data: bytes) -> bytes:
    raw = _NLATTR_HEADER.pack(_NLATTR_HEADER.size + len(data), kind) + data
    return raw.ljust(_align(len(raw)), b"\0")


def _message(kind: int, flags: int, sequence: int, attributes: bytes) -> bytes:
    body = _NFGEN_HEADER.pack(socket.AF_UNSPEC, 0, socket.htons(QUEUE_NUMBER)) + attributes
    return _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), kind, flags, sequence, 0) + body


def _messages(datagram: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink message in a datagram."""
    offset = 0
    while offset + _NLMSG_HEADER.size <= len(datagram):
        length, kind, _, _, _ = _NLMSG_HEADER.unpack_from(datagram, offset)
        yield kind, datagram[offset + _NLMSG_HEADER.size : offset + length]
        offset += _align(length)


def _packet_id(payload: bytes) -> int | None:
    """The id in an NFQNL_MSG_PACKET payload."""
    offset = _NFGEN_HEADER.size
    while offset + _NLATTR_HEADER.size <= len(payload):
        length, kind = _NLATTR_HEADER.unpack_from(payload, offset)
        if kind & _NLA_TYPE_MASK == _NFQA_PACKET_HDR:
            return struct.unpack_from("!I", payload, offset + _NLATTR_HEADER.size)[0]
        offset += _align(length)
    return None


class DelayQueue:
    """The namespace's NFQUEUE: holds each packet for `delay` seconds, drops `loss_percent` % of them."""

    def __init__(self, delay: float, loss_percent: float) -> None:
        self._delay = delay
        self._loss_percent = loss_percent
        self._held: collections.deque[tuple[float, int]] = collections.deque()  # (release time, packet id)
        self._release_timer: asyncio.TimerHandle | None = None
        self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        self._socket.bind((0, 0))
        # Packet notices must never be lost to a full socket buffer: a lost notice is a packet held forever.
        self._socket.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RECEIVE_BUFFER_BYTES)
        self._socket.setsockopt(_SOL_NETLINK, _NETLINK_NO_ENOBUFS, 1)
        self._bind()
        self._socket.setblocking(False)

    def _bind(self) -> None:
        flags = struct.pack("!I", _NFQA_CFG_F_GSO)  # whole GSO packets: we never look inside them
        attributes = (
            _attribute(_NFQA_CFG_CMD, struct.pack("!BxH", _NFQNL_CFG_CMD_BIND, 0))
            + _attribute(_NFQA_CFG_PARAMS, struct.pack("!IB", 0, _NFQNL_COPY_META))
            + _attribute(_NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", _QUEUE_MAX_PACKETS))
            + _attribute(_NFQA_CFG_FLAGS, flags)
            + _attribute(_NFQA_CFG_MASK, flags)
        )
        self._socket.send(_message(_NFQNL_MSG_CONFIG, _NLM_F_REQUEST | _NLM_F_ACK, 1, attributes))
        for kind, payload in _messages(self._socket.recv(65536)):
            error = -struct.unpack_from("=i", payload)[0] if kind == _NLMSG_ERROR else 0
            if error:
                raise OSError(error, f"binding NFQUEUE {QUEUE_NUMBER}: {os.strerror(error)}")

    def fileno(self) -> int:
        """The netlink socket, for the event loop."""
        return self._socket.fileno()

    def on_readable(self) -> None:
        """Take every packet notice waiting on the socket."""
        while True:
            try:
                datagram = self._socket.recv(65536)
            except BlockingIOError:
                return
            for kind, payload in _messages(datagram):
                packet_id = _packet_id(payload) if kind == _NFQNL_MSG_PACKET else None
                if packet_id is not None:
                    self._hold(packet_id)

    def _hold(self, packet_id: int) -> None:
        if random.random() * 100 < self._loss_percent:
            self._verdict(_NFQNL_MSG_VERDICT, packet_id, _NF_DROP)
            return
        loop = asyncio.get_running_loop()
        # Every packet waits the same time, so release times grow with arrival: a FIFO and one timer suffice.
        self._held.append((loop.time() + self._delay, packet_id))
        if self._release_timer is None:
            self._release_timer = loop.call_at(self._held[0][0], self._release_due)

    def _release_due(self) -> None:
        self._release_timer = None
        now = asyncio.get_running_loop().time()
        last_due = None
        while self._held and self._held[0][0] <= now:
            last_due = self._held.popleft()[1]
        if last_due is not None:
            # One batch verdict sends every held packet up to this id; dropped ones already got theirs.
            self._verdict(_NFQNL_MSG_VERDICT_BATCH, last_due, _NF_ACCEPT)
        if self._held:
            self._release_timer = asyncio.get_running_loop().call_at(self._held[0][0], self._release_due)

    def release_all(self) -> None:
        """Send every held packet now (closing the queue would drop them)."""
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        if self._held:
            self._verdict(_NFQNL_MSG_VERDICT_BATCH, self._held[-1][1], _NF_ACCEPT)
            self._held.clear()

    def _verdict(self, kind: int, packet_id: int, verdict: int) -> None:
        header = _attribute(_NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))
        self._socket.send(_message(kind, _NLM_F_REQUEST, 0, header))

    def close(self) -> None:
        """Leave the queue."""
        self._socket.close()


async def serve(delay: float, loss_percent: float) -> None:
    """Run the queue until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    queue = DelayQueue(delay, loss_percent)
    loop.add_reader(queue.fileno(), queue.on_readable)
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        loop.remove_reader(queue.fileno())
        queue.release_all()
        queue.close()


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.nfqueue_netem", description="Delay and drop the packets this namespace sends."
    )
    parser.add_argument("--delay-ms", type=float, default=0.0, help="how long each sent packet is held")
    parser.add_argument("--loss-percent", type=float, default=0.0, help="share of sent packets dropped")
    args = parser.parse_args()
    asyncio.run(serve(args.delay_ms / 1000, args.loss_percent))


if __name__ == "__main__":
    main()
