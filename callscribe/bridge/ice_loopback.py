"""Loopback ICE host candidates for WHIP clients on the same machine.

aioice leaves 127.0.0.1 out of its host candidates (`aioice.ice.get_host_addresses`), so on
a host whose only interface is loopback (a container with `--network none`, a laptop offline)
a browser on that machine has nothing to connect to. When the WHIP client itself came from a
loopback address, this adds 127.0.0.1 to the addresses the session's ICE agent gathers on —
for that session only, never for clients elsewhere (who could not reach it anyway).

It reaches into aiortc's gatherer (`RTCIceGatherer._connection`, aiortc 1.9-1.16); if that
changes, `offer_loopback_candidates` says so and the session goes on without loopback.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

log = logging.getLogger(__name__)

LOOPBACK_V4 = "127.0.0.1"


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def offer_loopback_candidates(pc: Any) -> bool:
    """Make every ICE agent of `pc` (call after setRemoteDescription, before
    setLocalDescription) also gather a host candidate on 127.0.0.1. False if aiortc's
    internals are not as expected (nothing changed then)."""
    patched: set[int] = set()
    try:
        for transceiver in pc.getTransceivers():
            transport = transceiver.receiver.transport
            connection = transport.transport.iceGatherer._connection
            if id(connection) in patched:
                continue  # BUNDLE: several transceivers share one ICE agent
            original = connection.get_component_candidates

            async def with_loopback(
                component: int, addresses: list[str], timeout: int = 5, _original: Any = original
            ) -> Any:
                wanted = addresses if LOOPBACK_V4 in addresses else [*addresses, LOOPBACK_V4]
                return await _original(component=component, addresses=wanted, timeout=timeout)

            connection.get_component_candidates = with_loopback
            patched.add(id(connection))
    except AttributeError as exc:
        log.warning("cannot offer loopback ICE candidates with this aiortc (%s)", exc)
        return False
    return bool(patched)
