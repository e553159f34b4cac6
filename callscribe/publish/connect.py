"""One Redis client from one URL: a single server (`redis://`, `rediss://`, `unix://`) or a
Redis Cluster (`redis+cluster://`, `rediss+cluster://`).

Cluster mode is chosen by the URL scheme rather than a separate setting because the URL is
already the one value every entry point takes (`serve`, `tail`, `demo`, the dashboard,
`CALLSCRIBE_REDIS_URL`), so the mode cannot disagree with the address.

A cluster URL names one or more seed nodes, comma separated
(`redis+cluster://user:pass@10.0.0.1:7000,10.0.0.2:7000`); the client discovers the rest
and follows failovers. Cluster mode has only database 0, so the path must be empty or `/0`.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

# Either client: both speak the commands callscribe uses (XADD, XREAD, XRANGE, EXPIRE, PING).
AnyRedis = aioredis.Redis | RedisCluster

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
DEFAULT_PORT = 6379


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def _host_port(address: str) -> tuple[str, int]:
    address = address.strip()
    if address.startswith("["):  # [::1]:7000
        host, _, port = address[1:].partition("]")
        port = port.removeprefix(":")
    elif address.count(":") == 1:
        host, _, port = address.partition(":")
    else:  # a bare host name or IPv6 address
        host, port = address, ""
    if not host:
        raise ValueError(f"redis cluster seed {address!r} has no host")
    try:
        return host, int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"redis cluster seed {address!r} has no valid port") from None


def cluster_seeds(url: str) -> tuple[str, list[tuple[str, int]]]:
    """(URL redis-py's cluster client accepts, every seed node) for a `redis+cluster://` URL."""
    scheme, _, rest = url.partition("://")
    base_scheme = CLUSTER_SCHEMES[scheme.lower()]
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    seeds = [_host_port(h) for h in hosts.split(",") if h.strip()]
    if not seeds:
        raise ValueError(f"redis cluster URL {url!r} names no node")
    path = tail.partition("?")[0]
    if path not in ("", "0"):
        raise ValueError(f"redis cluster URL {url!r}: a cluster has only database 0, not /{path}")
    host, port = seeds[0]
    first = f"[{host}]" if ":" in host else host
    return f"{base_scheme}://{userinfo}{at}{first}:{port}{slash}{tail}", seeds


def connect(url: str, **kwargs: Any) -> AnyRedis:
    """A client for `url`; `kwargs` go to redis-py (a standalone-only `connection_class`
    is left out for a cluster, whose nodes choose their own)."""
    if not is_cluster_url(url):
        return aioredis.from_url(url, **kwargs)
    kwargs.pop("connection_class", None)
    base, seeds = cluster_seeds(url)
    others = [ClusterNode(host, port) for host, port in seeds[1:]]
    return RedisCluster.from_url(base, startup_nodes=others or None, **kwargs)
