"""RTP over UDP: reserved leg ports (POST /v1/legs, SIP, SIPREC) and the auto-leg port.

A thin asyncio shell around `RtpLegReceiver`: datagrams are checked (allow_networks, size,
per-source rate, latched source), decoded inline (microseconds per packet) and fed to their
leg. A ticker every 20 ms releases jitter-buffer gaps that waited long enough and ends idle legs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from callscribe.bridge.rtp import Audio, Drop, LegEvent, RtpError, RtpLegReceiver, RtpPacket, is_rtcp
from callscribe.calls import AtCapacity, CallRegistry, Leg, LegConflict
from callscribe.codecs import spec_by_name, spec_for_static_pt
from callscribe.metrics import Metrics
from callscribe.security import AccessPolicy
from callscribe.settings import Settings

log = logging.getLogger(__name__)

TRANSPORT = "rtp"
TICK_SEC = 0.02
# Decoded audio reaches the leg in pieces of 60 ms (three 20 ms packets): each piece costs
# one resampler call (~10-20 µs whatever its length), so batching lifts a core from ~700 to
# well over 1,000 G.711 legs (bench/ingest.py). 60 ms more before the engine sees audio is
# small beside the 500-700 ms of silence that ends an utterance.
BATCH_MS = 60
MAX_CANDIDATES = 1024  # new sources on probation at the auto-leg port
PROBATION_SEC = 2.0
Address = tuple[Any, ...]  # (host, port) for IPv4, (host, port, flow, scope) for IPv6


@dataclass(frozen=True, slots=True)
class ReservedLeg:
    leg_id: str
    rtp_host: str
    rtp_port: int


class TokenBucket:
    """`rate` packets per second with a burst of one second's worth."""

    __slots__ = ("last", "rate", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.last = now

    def take(self, now: float) -> bool:
        tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


class _LegMedia:
    """A leg, its RTP receiver and (for reserved legs) its own socket and latched source."""

    def __init__(self, leg: Leg, receiver: RtpLegReceiver, now: float, source: Address | None = None) -> None:
        self.leg = leg
        self.receiver = receiver
        self.source = source
        self.last_packet = now
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.auto_key: tuple[Address, int] | None = None


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, ingest: RtpIngest, auto: bool) -> None:
        self._ingest = ingest
        self.auto = auto
        self.media: _LegMedia | None = None  # a reserved leg's, set once its leg is open

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self.media is not None:
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
        self.max_auto_legs_per_source = max_auto_legs_per_source
        self._bucket_limit = bucket_limit
        self._received = metrics.packets_received.labels(transport=TRANSPORT)
        self._legs: dict[str, _LegMedia] = {}  # by leg_id
        self._auto: dict[tuple[Address, int], _LegMedia] = {}  # by (source, SSRC)
        self._auto_per_host: dict[str, int] = {}
        self._buckets: dict[Address, TokenBucket] = {}
        self._candidates: dict[tuple[Address, int], tuple[RtpPacket, float]] = {}  # on probation
        self._ports_in_use: set[int] = set()
        self._port_cursor = 0
        self._auto_transport: asyncio.DatagramTransport | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    # -- Component --------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self, auto=True), local_addr=(self._settings.rtp_host, self._settings.rtp_port)
        )
        self._auto_transport = transport
        self._ticker = asyncio.create_task(self._tick_forever(), name="rtp-ticker")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for media in list(self._legs.values()):
            self._end(media, "shutdown")
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._auto_transport is not None:
            self._auto_transport.close()
            self._auto_transport = None

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
    ) -> ReservedLeg:
        """Open a leg now and a UDP port for its RTP; CodecError for an unknown codec,
        AtCapacity when no port is free, LegConflict for a duplicate leg name."""
        spec = spec_by_name(codec)
        receiver = self._new_receiver(spec.name, payload_types)
        transport, media_port = await self._bind_leg_port()
        try:
            opened = self._registry.open_leg(call_id, leg, meta)
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
        self._legs[opened.leg_id] = media
        host = self._settings.rtp_public_host or self._settings.rtp_host
        log.info("rtp leg reserved call_id=%s leg=%s codec=%s port=%d", call_id, leg, spec.name, media_port)
        return ReservedLeg(opened.leg_id, host, media_port)

    async def release(self, leg_id: str) -> bool:
        """End a leg (reason released) once its last final is out; False if unknown."""
        media = self._legs.get(leg_id)
        if media is None:
            # Possibly ending already (idle timeout): wait for its last final all the same.
            leg = self._registry.get(leg_id)
            if leg is None:
                return False
            await leg.close("released")
            return True
        self._emit(media, media.receiver.flush())
        self._forget(media)
        await media.leg.close("released")
        return True

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
        bucket = self._buckets.get(addr)
        # Only allowed sources get a bucket, so the allow-list is checked once per source.
        if bucket is None and not self._policy.source_allowed(str(addr[0])):
            self._metrics.drop(TRANSPORT, "not_allowed")
            return False
        if len(data) > self._settings.max_packet_bytes:
            self._metrics.drop(TRANSPORT, "oversize")
            return False
        if bucket is None:
            if len(self._buckets) >= self._bucket_limit:
                self._buckets.clear()  # spoofed-source flood; buckets refill at the full rate
            bucket = self._buckets[addr] = TokenBucket(self._settings.max_packets_per_sec_per_source, now)
        if not bucket.take(now):
            self._metrics.drop(TRANSPORT, "rate_limited")
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
            self._metrics.drop(TRANSPORT, "foreign_source")
            return
        else:
            events = media.receiver.receive(data, now)
        media.last_packet = now
        self._emit(media, events)

    def _parse(self, data: bytes) -> RtpPacket | None:
        """A packet, or None after counting why not."""
        if is_rtcp(data):
            self._metrics.drop(TRANSPORT, "rtcp")
            return None
        try:
            return RtpPacket.parse(data)
        except RtpError as exc:
            self._metrics.drop(TRANSPORT, exc.reason)
            return None

    def on_auto_datagram(self, data: bytes, addr: Address) -> None:
        now = asyncio.get_running_loop().time()
        if not self._admit(data, addr, now):
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
        """RFC 3550 A.1 probation: a new (source, SSRC) starts a leg only with two packets in
        sequence of a payload type the bridge decodes, so stray or random datagrams that
        happen to parse open no legs. Returns the first packet once confirmed."""
        pt = packet.payload_type
        if not (spec_for_static_pt(pt) or 96 <= pt <= 127):
            self._metrics.drop(TRANSPORT, "unknown_payload_type")
            return None
        held = self._candidates.pop(key, None)
        if held is not None and packet.sequence_number == (held[0].sequence_number + 1) % 65536:
            return held[0]
        if held is not None:
            self._metrics.drop(TRANSPORT, "unconfirmed_source")
        if len(self._candidates) >= MAX_CANDIDATES:
            self._metrics.drop(TRANSPORT, "unconfirmed_source", len(self._candidates))
            self._candidates.clear()
        self._candidates[key] = (packet, now)
        return None

    def _open_auto_leg(self, addr: Address, ssrc: int, now: float) -> _LegMedia | None:
        host = str(addr[0])
        if self._auto_per_host.get(host, 0) >= self.max_auto_legs_per_source:
            self._metrics.drop(TRANSPORT, "auto_leg_limit")
            return None
        # Sources need no handshake, so spoofed hosts pass the per-host cap: a global one too.
        if len(self._auto) >= self._settings.max_auto_legs:
            self._metrics.drop(TRANSPORT, "auto_leg_limit")
            return None
        call_id = f"rtp-{host}-{addr[1]}-{ssrc:08x}"
        try:
            leg = self._registry.open_leg(call_id, "caller", {"source": f"{host}:{addr[1]}", "ssrc": ssrc})
        except LegConflict:
            # The same source's previous leg (idle timeout) is still flushing its last final.
            self._metrics.drop(TRANSPORT, "leg_closing")
            return None
        except AtCapacity as exc:
            # Every packet of a refused source lands here: log at most every 10 s.
            if now - self._refusal_logged_at >= 10.0:
                self._refusal_logged_at = now
                log.warning(
                    "auto-leg refused for %s: %s (further refusals counted, not logged)", call_id, exc
                )
            self._metrics.drop(TRANSPORT, "at_capacity")
            return None
        media = _LegMedia(leg, self._new_receiver(self._settings.rtp_dynamic_codec, None), now, addr)
        media.auto_key = (addr, ssrc)
        self._auto[media.auto_key] = media
        self._auto_per_host[host] = self._auto_per_host.get(host, 0) + 1
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
            if isinstance(event, Audio):
                leg.feed(event.pcm, event.rate)
            elif isinstance(event, Drop):
                self._metrics.drop(TRANSPORT, event.reason)
            else:
                leg.dtmf(event.digit, event.duration_ms)

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
                self._end(media, "idle_timeout")
            else:
                events = media.receiver.poll(now)
                if events:
                    self._emit(media, events)
        if self._candidates:
            expired = [key for key, (_packet, seen) in self._candidates.items() if now - seen > PROBATION_SEC]
            for key in expired:
                del self._candidates[key]
            if expired:
                self._metrics.drop(TRANSPORT, "unconfirmed_source", len(expired))
        if len(self._buckets) > 1000:
            stale = [addr for addr, bucket in self._buckets.items() if now - bucket.last > 10.0]
            for addr in stale:
                del self._buckets[addr]

    def _end(self, media: _LegMedia, reason: str) -> None:
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
        if media.auto_key is not None:
            self._auto.pop(media.auto_key, None)
            host = str(media.auto_key[0][0])
            left = self._auto_per_host.get(host, 1) - 1
            if left > 0:
                self._auto_per_host[host] = left
            else:
                self._auto_per_host.pop(host, None)
