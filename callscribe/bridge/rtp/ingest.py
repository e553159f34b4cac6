"""RTP over UDP: reserved leg ports (POST /v1/legs, SIP, SIPREC) and the auto-leg port.

A thin asyncio shell around `RtpLegReceiver` and the rules of `rtp.admission`: datagrams are
checked (allow_networks, size, per-source rate, latched source), decoded inline and fed to
their leg. Each RTP socket has its RTCP socket at port + 1 (RFC 3550 §11), where only a BYE
matters: it ends the leg, as a BYE muxed on the RTP port does (RFC 5761). A ticker every
20 ms releases jitter-buffer gaps that waited long enough and ends idle legs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import numpy as np

from callscribe.bridge.events import CALLER, AudioReceived, Dropped, DropReason, DtmfReceived, EndReason
from callscribe.bridge.limits import AtCapacity, LegConflict, SourceLimit
from callscribe.bridge.rtp.admission import Address, Probation, SourceRates
from callscribe.bridge.rtp.packet import RtpError, RtpPacket, is_rtcp, rtcp_bye_ssrcs
from callscribe.bridge.rtp.ports import ReservedLeg
from callscribe.bridge.rtp.receiver import LegEvent, RtpLegReceiver
from callscribe.calls import CallRegistry, Leg
from callscribe.codecs import spec_by_name
from callscribe.metrics import Metrics
from callscribe.security import AccessPolicy
from callscribe.settings import Settings

log = logging.getLogger(__name__)

TRANSPORT = "rtp"
TICK_SEC = 0.02
# Decoded audio reaches the leg in pieces of 60 ms (three 20 ms packets): each piece costs
# one resampler call whatever its length, so batching raises the legs a core carries
# (bench/ingest.py measures it). 60 ms more before the engine sees audio is small beside
# the 500-700 ms of silence that ends an utterance.
BATCH_MS = 60


class _LegMedia:
    """A leg, its RTP receiver and (for reserved legs) its own socket and latched source."""

    def __init__(self, leg: Leg, receiver: RtpLegReceiver, now: float, source: Address | None = None) -> None:
        self.leg = leg
        self.receiver = receiver
        self.source = source
        self.last_packet = now
        self.transport: asyncio.DatagramTransport | None = None
        self.rtcp: asyncio.DatagramTransport | None = None
        self.port = 0
        self.auto_key: tuple[Address, int] | None = None


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, ingest: RtpIngest, auto: bool, rtcp: bool = False) -> None:
        self._ingest = ingest
        self.auto = auto
        self.rtcp = rtcp
        self.media: _LegMedia | None = None  # a reserved leg's, set once its leg is open

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self.rtcp:
            self._ingest.on_rtcp_datagram(self.media, data, addr)
        elif self.media is not None:
            self._ingest.on_leg_datagram(self.media, data, addr)
        elif self.auto:
            self._ingest.on_auto_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: nothing to do for a receive-only socket.
        log.debug("UDP error on RTP socket: %s", exc)


class RtpIngest:
    """The RTP Component of the service (see module doc)."""

    def __init__(
        self,
        settings: Settings,
        registry: CallRegistry,
        metrics: Metrics,
        policy: AccessPolicy,
        max_auto_legs_per_source: int = 64,
        bucket_limit: int = 100_000,
    ) -> None:
        self._settings = settings
        self._policy = policy
        self._registry = registry
        self._refusal_logged_at = float("-inf")
        self._metrics = metrics
        # A PBX sends every call from the same address; a sender inventing SSRCs must not
        # be able to open legs until the registry is full for everyone else.
        self._auto_per_host = SourceLimit(max_auto_legs_per_source)
        self._received = metrics.packets_received.labels(transport=TRANSPORT)
        self._legs: dict[str, _LegMedia] = {}  # by leg_id
        self._auto: dict[tuple[Address, int], _LegMedia] = {}  # by (source, SSRC)
        self._rates = SourceRates(settings.max_packets_per_sec_per_source, bucket_limit)
        self._probation = Probation()
        self._sample_rates: dict[str, int] = {}  # codec name of decoded audio → its rate
        self._ports_in_use: set[int] = set()
        self._port_cursor = 0
        self._auto_transport: asyncio.DatagramTransport | None = None
        self._auto_rtcp: asyncio.DatagramTransport | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def max_auto_legs_per_source(self) -> int:
        return self._auto_per_host.per_source

    @max_auto_legs_per_source.setter
    def max_auto_legs_per_source(self, value: int) -> None:
        self._auto_per_host.per_source = value

    # -- Component --------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self, auto=True), local_addr=(self._settings.rtp_host, self._settings.rtp_port)
        )
        self._auto_transport = transport
        self._auto_rtcp = await self._bind_rtcp(self.port, None)
        self._ticker = asyncio.create_task(self._tick_forever(), name="rtp-ticker")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for media in list(self._legs.values()):
            self._end(media, EndReason.SHUTDOWN)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._auto_transport is not None:
            self._auto_transport.close()
            self._auto_transport = None
        if self._auto_rtcp is not None:
            self._auto_rtcp.close()
            self._auto_rtcp = None

    @property
    def port(self) -> int:
        """The bound auto-leg port (settings may ask for 0)."""
        if self._auto_transport is None:
            return self._settings.rtp_port
        return int(self._auto_transport.get_extra_info("sockname")[1])

    # -- reserved legs ----------------------------------------------------------------

    async def reserve(
        self,
        call_id: str,
        leg: str,
        codec: str,
        meta: dict[str, Any] | None = None,
        payload_types: dict[int, str] | None = None,
        owner: str | None = None,
    ) -> ReservedLeg:
        """Open a leg now and a UDP port for its RTP; CodecError for an unknown codec,
        AtCapacity when no port is free, LegConflict for a duplicate leg name (or a call
        another `owner` opened)."""
        spec = spec_by_name(codec)
        receiver = self._new_receiver(spec.name, payload_types)
        transport, media_port = await self._bind_leg_port()
        try:
            opened = self._registry.open_leg(call_id, leg, meta, owner=owner)
        except BaseException:
            transport.close()
            self._ports_in_use.discard(media_port)
            raise
        media = _LegMedia(opened, receiver, asyncio.get_running_loop().time())
        media.transport = transport
        media.port = media_port
        protocol = transport.get_protocol()
        assert isinstance(protocol, _Endpoint)
        protocol.media = media
        media.rtcp = await self._bind_rtcp(media_port, media)
        self._legs[opened.leg_id] = media
        host = self._settings.rtp_public_host or self._settings.rtp_host
        log.info("rtp leg reserved call_id=%s leg=%s codec=%s port=%d", call_id, leg, spec.name, media_port)
        return ReservedLeg(opened.leg_id, host, media_port)

    async def release(self, leg_id: str, reason: EndReason = EndReason.RELEASED) -> bool:
        """End a leg once its last final is out; False if unknown. `reason` is leg.ended's:
        `released` when an API client deletes it, the signalling's (`hangup` on BYE) for SIP."""
        media = self._legs.get(leg_id)
        if media is None:
            # Possibly ending already (idle timeout): wait for its last final all the same.
            leg = self._registry.get(leg_id)
            if leg is None:
                return False
            await leg.close(reason)
            return True
        self._emit(media, media.receiver.flush())
        self._forget(media)
        await media.leg.close(reason)
        return True

    async def _bind_rtcp(self, rtp_port: int, media: _LegMedia | None) -> asyncio.DatagramTransport | None:
        """The RTCP socket at rtp_port + 1, or None when that port is taken: RTCP is optional
        (a peer may mux it, RFC 5761) and only its BYE matters here."""
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _Endpoint(self, auto=media is None, rtcp=True),
                local_addr=(self._settings.rtp_host, rtp_port + 1),
            )
        except OSError as exc:
            log.debug("no RTCP socket at port %d: %s", rtp_port + 1, exc)
            return None
        protocol.media = media
        return transport

    async def _bind_leg_port(self) -> tuple[asyncio.DatagramTransport, int]:
        loop = asyncio.get_running_loop()
        # Even ports only (RFC 3550 §11): a peer without rtcp-mux sends RTCP to port + 1,
        # which must not be another leg's RTP port.
        ports = [port for port in self._settings.rtp_ports if port % 2 == 0] or list(self._settings.rtp_ports)
        for attempt in range(len(ports)):
            port = ports[(self._port_cursor + attempt) % len(ports)]
            if port in self._ports_in_use:
                continue
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Endpoint(self, auto=False), local_addr=(self._settings.rtp_host, port)
                )
            except OSError:
                continue  # taken by another process
            # Rotate through the range so that a just-freed port is not reused at once
            # (late packets of the previous leg would land in the new one).
            self._port_cursor = (self._port_cursor + attempt + 1) % len(ports)
            self._ports_in_use.add(port)
            return transport, port
        self._metrics.legs_refused.labels(reason="rtp_ports").inc()
        raise AtCapacity(
            f"no free RTP port in {self._settings.rtp_port_range} ({len(self._ports_in_use)} in use)"
        )

    # -- datagrams --------------------------------------------------------------------

    def _admit(self, data: bytes, addr: Address, now: float) -> bool:
        """Source, size and per-source rate checks shared by every socket."""
        self._received.inc()
        # Only allowed sources get a bucket, so the allow-list is checked once per source.
        if not self._rates.known(addr) and not self._policy.source_allowed(str(addr[0])):
            self._metrics.drop(TRANSPORT, DropReason.NOT_ALLOWED)
            return False
        if len(data) > self._settings.max_packet_bytes:
            self._metrics.drop(TRANSPORT, DropReason.OVERSIZED)
            return False
        if not self._rates.take(addr, now):
            self._metrics.drop(TRANSPORT, DropReason.RATE_LIMITED)
            return False
        return True

    def on_leg_datagram(self, media: _LegMedia, data: bytes, addr: Address) -> None:
        now = asyncio.get_running_loop().time()
        if not self._admit(data, addr, now):
            return
        if media.source is None:
            packet = self._parse(data)
            if packet is None:
                return
            media.source = addr  # latched on the first valid RTP: no one else feeds this leg
            events = media.receiver.receive_packet(packet, now)
        elif addr != media.source:
            self._metrics.drop(TRANSPORT, DropReason.FOREIGN_SOURCE)
            return
        else:
            events = media.receiver.receive(data, now)
        media.last_packet = now
        self._emit(media, events)

    def _parse(self, data: bytes) -> RtpPacket | None:
        """A packet, or None after counting why not."""
        if is_rtcp(data):
            self._metrics.drop(TRANSPORT, DropReason.RTCP)
            return None
        try:
            return RtpPacket.parse(data)
        except RtpError as exc:
            self._metrics.drop(TRANSPORT, exc.reason)
            return None

    def on_rtcp_datagram(self, media: _LegMedia | None, data: bytes, addr: Address) -> None:
        """RTCP at port + 1 of a reserved leg (`media`) or of the auto-leg port (None)."""
        now = asyncio.get_running_loop().time()
        if not self._admit(data, addr, now):
            return
        if media is None:
            self._auto_rtcp_received(data, addr)
        elif media.source is not None and addr[0] == media.source[0]:
            media.last_packet = now
            self._emit(media, media.receiver.receive_rtcp(data))
        else:
            self._metrics.drop(TRANSPORT, DropReason.FOREIGN_SOURCE)

    def _auto_rtcp_received(self, data: bytes, addr: Address) -> None:
        """A BYE ends the auto-legs of its SSRCs from that host (RTCP comes from another port
        than the RTP, so the host and SSRC identify the leg)."""
        host = addr[0]
        ended = False
        for ssrc in rtcp_bye_ssrcs(data) or ():
            for (source, leg_ssrc), media in list(self._auto.items()):
                if leg_ssrc == ssrc and source[0] == host:
                    self._emit(media, media.receiver.receive_rtcp(data))
                    ended = True
        if not ended:
            self._metrics.drop(TRANSPORT, DropReason.RTCP)

    def on_auto_datagram(self, data: bytes, addr: Address) -> None:
        now = asyncio.get_running_loop().time()
        if not self._admit(data, addr, now):
            return
        if is_rtcp(data):
            self._auto_rtcp_received(data, addr)  # muxed (RFC 5761)
            return
        packet = self._parse(data)
        if packet is None:
            return
        key = (addr, packet.ssrc)
        media = self._auto.get(key)
        if media is not None:
            media.last_packet = now
            self._emit(media, media.receiver.receive_packet(packet, now))
            return
        first = self._confirm_source(key, packet, now)
        if first is None:
            return
        media = self._open_auto_leg(addr, packet.ssrc, now)
        if media is not None:
            self._emit(media, media.receiver.receive_packet(first, now))
            self._emit(media, media.receiver.receive_packet(packet, now))

    def _confirm_source(self, key: tuple[Address, int], packet: RtpPacket, now: float) -> RtpPacket | None:
        first, drops = self._probation.offer(key, packet, now)
        for reason, count in drops:
            self._metrics.drop(TRANSPORT, reason, count)
        return first

    def _open_auto_leg(self, addr: Address, ssrc: int, now: float) -> _LegMedia | None:
        host = str(addr[0])
        # Sources need no handshake, so spoofed hosts pass the per-host cap: a global one too
        # (checked first, so a refusal holds no per-host slot).
        if len(self._auto) >= self._settings.max_auto_legs or not self._auto_per_host.acquire(host):
            self._metrics.drop(TRANSPORT, DropReason.AUTO_LEG_LIMIT)
            return None
        call_id = f"rtp-{host}-{addr[1]}-{ssrc:08x}"
        try:
            leg = self._registry.open_leg(
                call_id, CALLER, {"source": f"{host}:{addr[1]}", "ssrc": ssrc}, owner=host
            )
        except LegConflict:
            self._auto_per_host.release(host)
            # The same source's previous leg (idle timeout) is still flushing its last final.
            self._metrics.drop(TRANSPORT, DropReason.LEG_CLOSING)
            return None
        except AtCapacity as exc:
            # Every packet of a refused source lands here: log at most every 10 s.
            if now - self._refusal_logged_at >= 10.0:
                self._refusal_logged_at = now
                log.warning(
                    "auto-leg refused for %s: %s (further refusals counted, not logged)", call_id, exc
                )
            self._auto_per_host.release(host)
            self._metrics.drop(TRANSPORT, DropReason.AT_CAPACITY)
            return None
        media = _LegMedia(leg, self._new_receiver(self._settings.rtp_dynamic_codec, None), now, addr)
        media.auto_key = (addr, ssrc)
        self._auto[media.auto_key] = media
        self._legs[leg.leg_id] = media
        log.info("rtp auto-leg started call_id=%s", call_id)
        return media

    def _new_receiver(self, codec: str, payload_types: dict[int, str] | None) -> RtpLegReceiver:
        return RtpLegReceiver(
            codec,
            payload_types,
            dtmf_payload_type=self._settings.dtmf_payload_type,
            jitter_ms=self._settings.jitter_ms,
            batch_ms=BATCH_MS,
        )

    def _emit(self, media: _LegMedia, events: list[LegEvent]) -> None:
        leg = media.leg
        for event in events:
            if isinstance(event, AudioReceived):
                rate = self._sample_rates.get(event.codec)
                if rate is None:
                    rate = self._sample_rates[event.codec] = spec_by_name(event.codec).sample_rate
                leg.feed(np.frombuffer(event.payload, dtype=np.int16), rate)
            elif isinstance(event, Dropped):
                self._metrics.drop(TRANSPORT, event.reason)
            elif isinstance(event, DtmfReceived):
                leg.dtmf(event.digit, event.duration_ms)
            elif self._legs.get(leg.leg_id) is media:  # SenderEnded
                log.info("rtp leg %s: the sender said BYE", leg.leg_id)
                self._end(media, event.reason)

    # -- time -------------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_SEC)
            try:
                self.tick(loop.time())
            except Exception:  # one bad leg must not stop timeouts for all the others
                log.exception("RTP tick failed")

    def tick(self, now: float) -> None:
        idle = self._settings.leg_idle_timeout_sec
        for media in list(self._legs.values()):
            if media.leg.closed:
                self._forget(media)  # closed elsewhere (shutdown drain, registry)
            elif now - media.last_packet >= idle:
                self._end(media, EndReason.IDLE_TIMEOUT)
            else:
                events = media.receiver.poll(now)
                if events:
                    self._emit(media, events)
        expired = self._probation.expire(now)
        if expired:
            self._metrics.drop(TRANSPORT, DropReason.UNCONFIRMED_SOURCE, expired)
        self._rates.forget_idle(now)

    def _end(self, media: _LegMedia, reason: EndReason) -> None:
        self._emit(media, media.receiver.flush())
        self._forget(media)
        task = asyncio.create_task(media.leg.close(reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _forget(self, media: _LegMedia) -> None:
        if self._legs.pop(media.leg.leg_id, None) is None:
            return
        if media.transport is not None:
            media.transport.close()
            self._ports_in_use.discard(media.port)
        if media.rtcp is not None:
            media.rtcp.close()
        if media.auto_key is not None:
            self._auto.pop(media.auto_key, None)
            self._auto_per_host.release(str(media.auto_key[0][0]))
