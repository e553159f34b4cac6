"""IP allow-lists: parsing them (settings validation) and matching a source against them.

Pure functions with no callscribe imports, so both `settings` (which validates the lists as
they are loaded) and `security` (which enforces them) can use them without importing each other.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """'10.0.0.0/8', '192.0.2.7' → networks; ValueError names the bad entry."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"allow-list entry {value!r} is not an address or network like 10.0.0.0/8"
            ) from None
    return tuple(networks)


def address_allowed(host: str, networks: Iterable[Network]) -> bool:
    """True for any host when `networks` is empty; otherwise only addresses inside one of them.
    A host that is not an IP address (a name, 'unknown') is never inside a network."""
    networks = tuple(networks)
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; match them against IPv4 lists.
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return any(address in network or (mapped is not None and mapped in network) for network in networks)
