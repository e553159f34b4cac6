"""TranscriptEvents → Redis Streams (schema v2, docs/contract.md).

`publish()` never blocks: it queues the event in the outage buffer and wakes one sender
task, which writes batches with a non-transactional pipeline. A batch leaves the sender
only once Redis has answered for all of it, so a write that failed half-way is sent again
(at-least-once: consumers dedupe on call_id+leg+seq), never lost. While Redis is down the
sender retries with backoff (0.1 s → 2 s) and the buffer coalesces partials and spools
the overflow; replay is in publish order, so per-leg order holds.

Events not written are counted in `events_dropped` by reason: superseded_partial (a newer
partial of the leg replaced it), overflow_partial / overflow (no spool: past the buffer,
partials first; past 10x the buffer, the oldest event, logged as LOST), redis_rejected (a
reply such as WRONGTYPE that no retry can fix), shutdown (close() with Redis down and no
spool) and closed (published after close()).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from callscribe.events import EventType, TranscriptEvent
from callscribe.metrics import Metrics
from callscribe.publish.connect import AnyRedis, connect
from callscribe.publish.lease import InstanceLease, keep_lease, resolve_instance_id
from callscribe.publish.outage import Displaced, OutageBuffer
from callscribe.publish.spool import Spool
from callscribe.settings import Settings

log = logging.getLogger(__name__)

BATCH_EVENTS = 500
BACKOFF_FIRST_SEC = 0.1
BACKOFF_MAX_SEC = 2.0
# An idle sender pings this often so `connected` (and /readyz) notices an outage without traffic.
IDLE_PING_SEC = 1.0
FIRST_PING_SEC = 1.0
# A write slower than this counts as a failure: the batch is retried and events keep queueing.
SOCKET_TIMEOUT_SEC = 5.0
# Replies that mean "try again later" rather than "this command is wrong".
PARTIALS_TTL_SEC = 60
TRANSIENT_REPLIES = ("OOM", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "BUSY")
# In a cluster, a slot moving or its master failing over: redirect or wait, never drop.
CLUSTER_TRANSIENT_REPLIES = ("MOVED", "ASK")


def _transient(reply: ResponseError) -> bool:
    """redis-py strips the error code from the message of the errors it has a class for
    (READONLY, CLUSTERDOWN...) and keeps it in `status_code`; match both."""
    code = getattr(reply, "status_code", None) or str(reply).split(" ", 1)[0]
    return code in TRANSIENT_REPLIES or code in CLUSTER_TRANSIENT_REPLIES


class HiredisPackingConnection(Connection):
    """redis-py's asyncio connection packs commands in Python, ~80 µs for the XADD of one
    transcript event (32 arguments) on a busy core; hiredis packs the same bytes in C in ~7 µs."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if isinstance(name, str) and " " in name:  # "CLIENT SETINFO": separate arguments
            args = (*name.split(), *args[1:])
        return [hiredis.pack_command(args)]


def call_stream_key(prefix: str, call_id: str) -> str:
    """Every event of one call except partials, never trimmed while the call is open (it
    expires `call_ttl_sec` after call.ended); `{call_id}` is a Redis Cluster hash tag."""
    return f"{prefix}:call:{{{call_id}}}"


def partials_stream_key(prefix: str, call_id: str) -> str:
    """The partials of one call, capped at ~`stream_maxlen`: partials are many (one every
    ~270 ms per speaking leg) and short-lived, so they live apart where trimming them can
    never push a final or call.started out of the call stream (schema v2)."""
    return f"{prefix}:call:{{{call_id}}}:partials"


def calls_stream_key(prefix: str) -> str:
    """call.started and call.ended of every call (discovery)."""
    return f"{prefix}:calls"


def finals_stream_key(prefix: str) -> str:
    """Every final of every call."""
    return f"{prefix}:finals"


class RedisStreamsPublisher:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._prefix = settings.key_prefix
        self._spool = Spool(settings.spool_dir) if settings.spool_dir is not None else None
        self._buffer = OutageBuffer(settings.outage_buffer_events, spooling=self._spool is not None)
        self._client: AnyRedis | None = None
        self._sender: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()  # replaced after each set: a broadcast per write
        # The batch being written: events with their ordinals (0 for spooled events).
        self._batch: list[tuple[int, TranscriptEvent]] = []
        self._batch_from_spool = False
        self._up = False
        self._closed = False
        self._down_since: float | None = None
        self._recovery: tuple[float, int] | None = None  # (outage seconds, events to replay)
        self._replayed = 0
        self._lost = 0  # non-partial events lost, in total
        self._lost_logged_at = -1e9
        # Calls left open by a dead instance get ended (see lease.py).
        instance_id = resolve_instance_id(settings.instance_id, settings.spool_dir)
        self.lease = InstanceLease(self._prefix, instance_id, settings.instance_lease_sec)
        self._lease_task: asyncio.Task[None] | None = None
        self._old_spooled = 0  # events an earlier run left in the spool, not yet replayed
        self._batch_replayed = 0
        self._batch_peeked = 0
        metrics.redis_up.set(0)
        self._update_depth()

    @property
    def connected(self) -> bool:
        """True when the last write or ping succeeded."""
        return self._up

    @property
    def buffer_depth(self) -> int:
        """Events published but not yet written (memory, spool and the batch in flight)."""
        return len(self._buffer) + len(self._batch) + (len(self._spool) if self._spool else 0)

    def publish(self, event: TranscriptEvent) -> None:
        if self._closed:
            self._lose([(event, "closed")])
            return
        displaced = self._buffer.push(event)
        if self._spool is not None and not self._up and event.type != EventType.PARTIAL:
            # Redis is down: a final or lifecycle event is on disk (write(2), enough for a
            # SIGKILL; see docs/crash-safety.md) before publish() returns, with all before it.
            spilled = self._buffer.spill()
            displaced.spool += spilled.spool
        self._handle(displaced)
        self._update_depth()
        self._wake.set()

    async def start(self) -> None:
        """Connect and start the sender. Redis being down is not an error: events wait."""
        # A redis+cluster:// URL gives a cluster client (see connect.py): every command here
        # is single-key, so the pipeline may be split across masters by slot.
        self._client = connect(
            self._settings.redis_url,
            socket_timeout=SOCKET_TIMEOUT_SEC,
            socket_connect_timeout=SOCKET_TIMEOUT_SEC,
            # Retries are ours (the batch stays until written); a client retry inside a
            # pipeline would only add duplicates and hide the outage from the metrics.
            retry=Retry(NoBackoff(), 0),
            # Only for redis:// URLs: unix:// and rediss:// choose their own connection class.
            connection_class=HiredisPackingConnection,
        )
        if self._spool is not None and len(self._spool):
            log.warning("replaying %d events spooled in %s", len(self._spool), self._spool.directory)
            self._old_spooled = len(self._spool)
            self._update_depth()
        # One quick ping so `connected` (and /readyz) is right as soon as start() returns.
        try:
            async with asyncio.timeout(FIRST_PING_SEC):
                await self._ping()
            self._succeeded(0)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
        self._sender = asyncio.create_task(self._run(), name="redis-streams-sender")
        self._lease_task = asyncio.create_task(
            keep_lease(self.lease, self._client, self.publish, self._may_sweep), name="instance-lease"
        )

    def _may_sweep(self) -> bool:
        # Only once what an earlier run spooled is in Redis: its events come before any sweep.
        return self._up and not self._closed and (self._spool is None or not len(self._spool))

    # `timeout` parameters: the API the service and the HTTP app call (see service.py).
    async def wait_flushed(self, timeout: float) -> bool:
        """True once every event published before this call has been written (or dropped
        as superseded); False if that takes longer than `timeout` seconds."""
        target = self._buffer.last_ordinal
        try:
            async with asyncio.timeout(timeout):
                while not self._flushed_through(target):
                    await self._progress.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 10.0) -> None:
        """Flush what Redis takes within `timeout`, spool the rest (or say loudly what is lost)."""
        if self._closed:
            return
        flushed = False
        if self._sender is not None:
            flushed = await self.wait_flushed(timeout)
        self._closed = True
        if self._lease_task is not None:
            await _stop(self._lease_task)
            if flushed and self._client is not None:
                # Every call ended in Redis: no sweep needed, don't wait for the TTL.
                with contextlib.suppress(RedisError, OSError):
                    await self.lease.release(self._client)
        if self._sender is not None:
            await _stop(self._sender)
            self._sender = None
        self._keep_unwritten()
        if self._spool is not None:
            self._spool.close()
        if self._client is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()
        self._update_depth()

    def _keep_unwritten(self) -> None:
        # Oldest first: the batch in flight (unless it is still in the spool), the spool, memory.
        in_flight = [] if self._batch_from_spool else [event for _, event in self._batch]
        memory = [event for _, event in self._buffer.drain()]
        self._batch = []
        if self._spool is not None and (in_flight or memory or len(self._spool)):
            try:
                self._spool.prepend(in_flight)
                in_flight = []
                self._spool.append(memory)
                memory = []
                log.warning(
                    "redis unavailable at shutdown: %d events spooled in %s, replayed at next start",
                    len(self._spool),
                    self._spool.directory,
                )
            except OSError as exc:
                log.error("spool %s failed at shutdown: %s", self._spool.directory, exc)
        self._lose([(event, "shutdown") for event in in_flight + memory])

    # The sender task.

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST_SEC
        while True:
            written = 0
            try:
                if not self._batch:
                    self._next_batch()
                if self._batch:
                    written = await self._write()
                elif self._up and self._down_since is None:
                    # Idle and healthy: wait for events, pinging now and then.
                    self._wake.clear()
                    try:
                        async with asyncio.timeout(IDLE_PING_SEC):
                            await self._wake.wait()
                        continue
                    except TimeoutError:
                        await self._ping()
                else:
                    await self._ping()
            except (RedisError, OSError) as exc:
                self._failed(exc)
                await self._forget_topology()
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX_SEC, backoff * 2)
                continue
            except Exception:
                # A bug must not stop publishing for every call: say it, keep the batch, go on.
                log.exception("redis streams sender failed; retrying")
                await asyncio.sleep(BACKOFF_MAX_SEC)
                continue
            backoff = BACKOFF_FIRST_SEC
            self._succeeded(written)

    def _next_batch(self) -> None:
        """The oldest unwritten events: the spool's first, then memory's."""
        while self._spool is not None and len(self._spool):
            events = self._spool.peek(BATCH_EVENTS)
            fresh = [e for e in events if not self._buffer.is_stale(e)]
            self._buffer.settle(events)
            if fresh:
                self._batch = [(0, event) for event in fresh]
                self._batch_from_spool = True
                # How many of them an earlier run left (the spool is FIFO: the first peeked).
                kept = {id(e) for e in fresh}
                self._batch_replayed = sum(1 for e in events[: self._old_spooled] if id(e) in kept)
                self._batch_peeked = len(events)
                return
            # Only superseded partials or undecodable lines: consume them without a write.
            self._spool.commit()
            self._old_spooled = max(0, self._old_spooled - len(events))
            self._update_depth()
        self._batch = self._buffer.take(BATCH_EVENTS)
        self._batch_from_spool = False

    async def _write(self) -> int:
        """Write the batch; raises (keeping the batch) unless Redis answered for all of it."""
        assert self._client is not None
        events = [event for _, event in self._batch]
        # The first `replayed` events of a spool batch are an earlier run's (spool is FIFO).
        replayed = self._batch_replayed if self._batch_from_spool else 0
        pipe = self._client.pipeline(transaction=False)
        commands: list[int] = []  # index of the event each command belongs to
        for index, event in enumerate(events):
            for command in self._commands(event) + self.lease.tracking_commands(event, index < replayed):
                pipe.execute_command(*command)
                commands.append(index)
        replies: Sequence[Any] = await pipe.execute(raise_on_error=False)
        rejected: dict[int, ResponseError] = {}
        for index, reply in zip(commands, replies, strict=True):
            if isinstance(reply, ResponseError):
                if _transient(reply):
                    raise reply
                rejected.setdefault(index, reply)
            elif isinstance(reply, Exception):
                raise reply
        for index, reply in rejected.items():
            # Retrying a command Redis refuses (WRONGTYPE...) would wedge every call behind it.
            log.error("redis refused event %s: %s", _describe(events[index]), reply)
        self._lose([(events[i], "redis_rejected") for i in rejected], log_finals=False)
        written = Counter(str(e.type) for i, e in enumerate(events) if i not in rejected)
        for kind, count in written.items():
            self._metrics.events_published.labels(type=kind).inc(count)
        if self._batch_from_spool and self._spool is not None:
            self._spool.commit()
            self._old_spooled = max(0, self._old_spooled - self._batch_peeked)
        self._batch = []
        return len(events)

    def _commands(self, event: TranscriptEvent) -> list[tuple[Any, ...]]:
        settings = self._settings
        fields: list[str] = []
        for name, value in event.to_fields().items():
            fields += (name, value)
        key = call_stream_key(self._prefix, event.call_id)
        partials = partials_stream_key(self._prefix, event.call_id)
        commands: list[tuple[Any, ...]]
        if event.type == EventType.PARTIAL:
            commands = [("XADD", partials, "MAXLEN", "~", settings.stream_maxlen, "*", *fields)]
        else:
            commands = [("XADD", key, "*", *fields)]
        if event.type in (EventType.CALL_STARTED, EventType.CALL_ENDED):
            commands.append(
                ("XADD", calls_stream_key(self._prefix), "MAXLEN", "~", settings.finals_maxlen, "*", *fields)
            )
        elif event.type == EventType.FINAL:
            commands.append(
                ("XADD", finals_stream_key(self._prefix), "MAXLEN", "~", settings.finals_maxlen, "*", *fields)
            )
        if event.type == EventType.CALL_ENDED:
            commands.append(("EXPIRE", key, settings.call_ttl_sec))
            # Partials are worthless once the call is over; a minute lets live readers finish.
            commands.append(("EXPIRE", partials, min(settings.call_ttl_sec, PARTIALS_TTL_SEC)))
        return commands

    async def _forget_topology(self) -> None:
        """After a failed write to a cluster, rediscover which master owns which slot: the
        cluster client refreshes it by itself only on its own retries, and ours are here
        (a dead master's slots go to its replica after the failover)."""
        if isinstance(self._client, RedisCluster):
            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()

    async def _ping(self) -> None:
        assert self._client is not None
        await self._client.ping()

    def _failed(self, exc: BaseException) -> None:
        self._metrics.publish_failures.inc()
        self._spool_in_flight()
        self._up = False
        self._metrics.redis_up.set(0)
        self._recovery = None
        if self._down_since is None:
            self._down_since = time.monotonic()
            kind = "slow" if isinstance(exc, RedisTimeoutError) else "unreachable"
            if isinstance(exc, ResponseError):
                kind = "refusing writes"
            log.error(
                "redis %s, buffering %d events (%s: %s)",
                kind,
                self.buffer_depth,
                type(exc).__name__,
                exc,
            )
        elif not isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
            log.debug("redis still failing: %s", exc)

    def _succeeded(self, written: int) -> None:
        if not self._up:
            self._up = True
            self._metrics.redis_up.set(1)
        if self._down_since is not None:
            self._recovery = (time.monotonic() - self._down_since, self.buffer_depth + written)
            self._replayed = 0
            self._down_since = None
        self._replayed += written
        if self._recovery is not None and (self._replayed >= self._recovery[1] or not self.buffer_depth):
            log.warning(
                "redis back after %.1f s, replayed %d events",
                self._recovery[0],
                self._replayed,
            )
            self._recovery = None
        self._update_depth()
        self._progress.set()
        self._progress = asyncio.Event()

    def _spool_in_flight(self) -> None:
        """The write failed: the batch in flight (taken from memory) and everything after it
        go to disk now, oldest first, instead of waiting in this process's memory."""
        if self._spool is None or not self._buffer.spooling:
            return
        try:
            if self._batch and not self._batch_from_spool:
                self._spool.prepend(event for _, event in self._batch)
                self._batch = []
        except OSError as exc:
            log.error("spool %s failed (%s): keeping events in memory", self._spool.directory, exc)
            return
        self._handle(self._buffer.spill())
        self._update_depth()

    def _flushed_through(self, ordinal: int) -> bool:
        if self._spool is not None and len(self._spool):
            return False
        if self._batch and (self._batch_from_spool or self._batch[0][0] <= ordinal):
            return False
        first = self._buffer.first_ordinal
        return first is None or first > ordinal

    # Buffer bookkeeping.

    def _handle(self, displaced: Displaced) -> None:
        if displaced.spool:
            assert self._spool is not None
            try:
                self._spool.append(event for _, event in displaced.spool)
            except OSError as exc:
                log.error(
                    "spool %s failed (%s): keeping events in memory, spooling disabled",
                    self._spool.directory,
                    exc,
                )
                self._handle(self._buffer.spool_failed(displaced.spool))
        if displaced.dropped:
            self._lose(displaced.dropped)

    def _lose(self, dropped: list[tuple[TranscriptEvent, str]], log_finals: bool = True) -> None:
        reasons = Counter(reason for _, reason in dropped)
        for reason, count in reasons.items():
            self._metrics.events_dropped.labels(reason=reason).inc(count)
        lost = [e for e, _ in dropped if e.type != EventType.PARTIAL]
        if not lost:
            return
        self._lost += len(lost)
        now = time.monotonic()
        # At most one line a second: a full buffer loses an event per publish.
        if log_finals and now - self._lost_logged_at >= 1.0:
            self._lost_logged_at = now
            log.error(
                "LOST %d events that are not partials (%s), %d in total; e.g. %s",
                len(lost),
                ", ".join(f"{reason}={count}" for reason, count in reasons.items()),
                self._lost,
                _describe(lost[0]),
            )

    def _update_depth(self) -> None:
        self._metrics.outage_buffer_depth.set(self.buffer_depth)


# How long _stop() waits for a cancelled task before cancelling it again.
STOP_RECANCEL_SEC = 0.1


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait until it has ended. One cancel is not always enough: on
    Python 3.11, `asyncio.wait_for` returns the result, dropping the cancellation, when the
    cancel arrives just as the awaited operation completes (CPython gh-86296, fixed in 3.12),
    and redis-py wraps every socket write in it when `socket_timeout` is set. The sender and
    the lease loop would then go on forever and close() would never return, so cancel again
    until the task is done."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=STOP_RECANCEL_SEC)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _describe(event: TranscriptEvent) -> str:
    return f"{event.type} call_id={event.call_id} leg={event.leg} seq={event.seq}"
