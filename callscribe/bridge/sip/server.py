"""SIP over UDP and TCP for the UAS core: a Component with async start()/stop().

The sockets only move bytes: every datagram or framed TCP message goes to `UasCore.receive()`
with the loop's clock, whatever the core wants sent goes out on the transport it came in on
(responses are symmetric, like RFC 3581 rport). One `loop.call_at` timer is armed for the
core's `next_deadline()` and re-armed after every input and every expiry (as aioquic's
protocol does with `get_timer()`), so an idle server never wakes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from callscribe.bridge.events import Dropped, DropReason
from callscribe.bridge.rtp.ports import RtpPorts
from callscribe.bridge.sip.events import (
    AckReceived,
    DialogEnded,
    InviteCancelled,
    InviteReceived,
    SipEvent,
)
from callscribe.bridge.sip.message import Peer, SipParseError, StreamFramer
from callscribe.bridge.sip.session import ACCEPTED_BODIES, TRANSPORT, SipCallHandler
from callscribe.bridge.sip.uas import UasCore
from callscribe.calls import CallRegistry
from callscribe.metrics import Metrics
from callscribe.security import AccessPolicy
from callscribe.settings import Settings

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65_535
MAX_TCP_CONNECTIONS = 512


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: SipServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.server.deliver(data, Peer("udp", str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        log.debug("SIP UDP socket error: %s", exc)


ANY_PORT_ATTEMPTS = 20  # sip_port 0: tries for a number free for both UDP and TCP


class SipServer:
    """SIP UAS on `settings.sip_host:sip_port` (UDP and TCP on the same port)."""

    def __init__(
        self,
        settings: Settings,
        rtp: RtpPorts,
        metrics: Metrics,
        policy: AccessPolicy,
        registry: CallRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self._registry = registry
        self.metrics = metrics
        self._rtp = rtp
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._writers: dict[Peer, asyncio.StreamWriter] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.port = settings.sip_port
        self.core: UasCore | None = None
        self.handler: SipCallHandler | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # UDP and TCP share one port number. With sip_port 0 the kernel picks it for UDP, and
        # the same number may be taken for TCP (an outgoing connection's ephemeral port): then
        # both are given back and another number is tried.
        attempts = ANY_PORT_ATTEMPTS if self.settings.sip_port == 0 else 1
        for attempt in range(attempts):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.settings.sip_host, self.settings.sip_port)
            )
            self.port = int(transport.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.settings.sip_host, self.port)
            except OSError:
                transport.close()
                if attempt + 1 == attempts:
                    raise
                continue
            self._udp = transport
            break
        host = self.settings.sip_public_host or self.settings.rtp_public_host or self.settings.sip_host
        contact_host = f"[{host}]" if ":" in host else host
        self.core = UasCore(
            contact=f"<sip:callscribe@{contact_host}:{self.port}>;+sip.srs",
            accept=ACCEPTED_BODIES,
        )
        registry = self._registry
        self.handler = SipCallHandler(
            self.settings,
            self.core,
            self._rtp,
            self.metrics,
            self.policy,
            self.flush,
            loop.time,
            leg_open=(lambda leg_id: registry.get(leg_id) is not None) if registry else lambda leg_id: True,
        )
        log.info("SIP listening on %s:%d (udp, tcp)", self.settings.sip_host, self.port)

    async def stop(self) -> None:
        if self.handler is not None:
            await self.handler.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._writers.values()):
                writer.close()
            await self._tcp.wait_closed()
        if self._udp is not None:
            self._udp.close()

    # -- bytes in --------------------------------------------------------------------------

    def deliver(self, data: bytes, peer: Peer) -> None:
        if self.core is None:
            return
        self.metrics.packets_received.labels(transport=TRANSPORT).inc()
        if len(data) > MAX_DATAGRAM:
            self.metrics.drop(TRANSPORT, DropReason.OVERSIZED)
            return
        loop = asyncio.get_running_loop()
        events = self.core.receive(data, peer, loop.time())
        self.flush()
        self._dispatch(events)

    def _dispatch(self, events: list[SipEvent]) -> None:
        assert self.handler is not None
        for event in events:
            if isinstance(event, Dropped):
                self.metrics.drop(TRANSPORT, event.reason)
                log.debug("SIP message dropped: %s", event.detail)
            elif isinstance(event, InviteReceived):
                self._spawn(self.handler.on_invite(event))
            elif isinstance(event, AckReceived):
                self._spawn(self.handler.on_ack(event))
            elif isinstance(event, InviteCancelled):
                self.handler.on_cancel(event)
            elif isinstance(event, DialogEnded):
                self._spawn(self.handler.on_ended(event))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = writer.get_extra_info("peername")
        peer = Peer("tcp", str(address[0]), int(address[1]))
        if len(self._writers) >= MAX_TCP_CONNECTIONS:
            self.metrics.drop(TRANSPORT, DropReason.CONNECTION_LIMIT)
            writer.close()
            return
        self._writers[peer] = writer
        framer = StreamFramer()
        try:
            while data := await reader.read(65536):
                try:
                    messages = framer.feed(data)
                except SipParseError as exc:
                    # A stream we cannot frame any more cannot be resynchronised: close it.
                    self.metrics.drop(TRANSPORT, exc.reason)
                    log.info("closing SIP TCP connection from %s:%d: %s", peer.host, peer.port, exc)
                    break
                for message in messages:
                    self.deliver(message, peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.pop(peer, None)
            writer.close()

    # -- bytes out and timers -------------------------------------------------------------

    def flush(self) -> None:
        if self.core is None:
            return
        for data, peer in self.core.outgoing():
            if peer.transport == "udp":
                if self._udp is not None:
                    self._udp.sendto(data, (peer.host, peer.port))
            else:
                writer = self._writers.get(peer)
                if writer is None or writer.is_closing():
                    self.metrics.drop(TRANSPORT, DropReason.TCP_PEER_GONE)
                else:
                    writer.write(data)
        self._arm_timer()

    def _arm_timer(self) -> None:
        """One timer for the core's earliest deadline; moved only when that deadline moves."""
        if self.core is None:
            return
        deadline = self.core.next_deadline()
        if deadline == self._timer_at and (deadline is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        # The loop runs a handle up to one clock resolution early: never hand the core a time
        # before the deadline it asked for, or it would find nothing due and be re-armed at once.
        now = max(asyncio.get_running_loop().time(), self._timer_at or 0.0)
        self._timer = None
        self._timer_at = None
        assert self.core is not None
        events = self.core.handle_timers(now)
        self.flush()
        self._dispatch(events)
