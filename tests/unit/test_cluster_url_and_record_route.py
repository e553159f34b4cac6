"""Issue 14 product fixes found with real peers: `redis+cluster://` URLs (Redis Cluster) and
Record-Route copied into the responses that set up a dialog (Kamailio in front)."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterDownError, ReadOnlyError, ResponseError, TryAgainError

from callscribe.bridge.sip.message import SipRequest, build_response, parse_message
from callscribe.publish.connect import cluster_seeds, connect, is_cluster_url
from callscribe.publish.redis_streams import _transient


def test_cluster_url_names_every_seed() -> None:
    assert cluster_seeds("redis+cluster://10.0.0.1:7000,10.0.0.2:7001") == (
        "redis://10.0.0.1:7000",
        [("10.0.0.1", 7000), ("10.0.0.2", 7001)],
    )
    base, seeds = cluster_seeds("rediss+cluster://u:p%40ss@[::1]:7000,node-b/0?ssl_cert_reqs=none")
    assert base == "rediss://u:p%40ss@[::1]:7000/0?ssl_cert_reqs=none"
    assert seeds == [("::1", 7000), ("node-b", 6379)]
    assert is_cluster_url("REDIS+CLUSTER://h:1") and not is_cluster_url("redis://h:1")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://", "names no node"),
        ("redis+cluster://h:1/2", "only database 0"),
        ("redis+cluster://h:port", "no valid port"),
    ],
)
def test_bad_cluster_urls_say_why(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cluster_seeds(url)


async def test_cluster_url_gives_a_cluster_client_and_drops_the_connection_class() -> None:
    from callscribe.publish.redis_streams import HiredisPackingConnection

    client = connect(
        "redis+cluster://127.0.0.1:7000,127.0.0.1:7001", connection_class=HiredisPackingConnection
    )
    assert isinstance(client, RedisCluster)
    await client.aclose()


def test_replies_redis_py_strips_the_code_of_still_count_as_transient() -> None:
    # redis-py turns "READONLY You can't write..." into ReadOnlyError("You can't write...").
    assert _transient(ReadOnlyError("You can't write against a read only replica.", status_code="READONLY"))
    assert _transient(ClusterDownError("The cluster is down", status_code="CLUSTERDOWN"))
    assert _transient(TryAgainError("Multiple keys request during rehashing of slot", status_code="TRYAGAIN"))
    assert _transient(ResponseError("BUSY Redis is busy running a script"))
    assert not _transient(ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))


INVITE = (
    b"INVITE sip:srs@192.0.2.10:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-p\r\n"
    b"Via: SIP/2.0/UDP 198.51.100.9:5062;branch=z9hG4bK-1;rport\r\n"
    b"Record-Route: <sip:192.0.2.1;lr;ftag=ft1>\r\n"
    b"Record-Route: <sip:203.0.113.5;lr>\r\n"
    b"From: <sip:sbc@example.com>;tag=ft1\r\n"
    b"To: <sip:srs@192.0.2.10>\r\n"
    b"Call-ID: rr-1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Content-Length: 0\r\n\r\n"
)


@pytest.mark.parametrize(("status", "copied"), [(180, True), (200, True), (100, False), (486, False)])
def test_record_route_is_copied_in_order_into_dialog_responses(status: int, copied: bool) -> None:
    request = parse_message(INVITE)
    assert isinstance(request, SipRequest)
    response = build_response(request, status, to_tag="tt1")
    expected = ["<sip:192.0.2.1;lr;ftag=ft1>", "<sip:203.0.113.5;lr>"] if copied else []
    assert response.headers.get_all("record-route") == expected


def test_settings_refuse_a_cluster_url_with_a_database() -> None:
    from pydantic import ValidationError

    from callscribe.settings import Settings

    with pytest.raises(ValidationError, match="only database 0"):
        Settings(redis_url="redis+cluster://10.0.0.1:7000/2")
    assert Settings(redis_url="redis+cluster://10.0.0.1:7000").redis_url == "redis+cluster://10.0.0.1:7000"
