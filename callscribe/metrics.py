"""Prometheus metrics, one registry per service instance (no module-level collectors)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.packets_received = Counter(
            "callscribe_packets_received", "Media packets or frames received", ["transport"], registry=r
        )
        self.packets_dropped = Counter(
            "callscribe_packets_dropped",
            "Media packets or frames dropped, by reason",
            ["transport", "reason"],
            registry=r,
        )
        self.audio_seconds = Counter(
            "callscribe_audio_seconds", "Seconds of leg audio passed to the engine", registry=r
        )
        self.events_published = Counter(
            "callscribe_events_published", "Events written to Redis", ["type"], registry=r
        )
        self.publish_failures = Counter(
            "callscribe_publish_failures", "Failed writes to Redis (events kept and retried)", registry=r
        )
        self.events_dropped = Counter(
            "callscribe_events_dropped",
            "Events not published (superseded partials while Redis was slow or down)",
            ["reason"],
            registry=r,
        )
        self.outage_buffer_depth = Gauge(
            "callscribe_outage_buffer_depth", "Events waiting for Redis", registry=r
        )
        self.redis_up = Gauge("callscribe_redis_up", "1 when the last Redis write succeeded", registry=r)
        self.active_calls = Gauge("callscribe_active_calls", "Calls with at least one open leg", registry=r)
        self.active_legs = Gauge("callscribe_active_legs", "Open legs", registry=r)
        self.legs_refused = Counter(
            "callscribe_legs_refused", "Legs refused at admission, by reason", ["reason"], registry=r
        )
        self.partial_latency = Histogram(
            "callscribe_partial_latency_seconds",
            "From the end of a partial's audio reaching the engine to its event",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.final_latency = Histogram(
            "callscribe_final_latency_seconds",
            "From the end of an utterance's audio reaching the engine to its final",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_queue_depth = Gauge(
            "callscribe_engine_queue_depth", "Decode requests waiting in the engine", registry=r
        )
        self.engine_errors = Counter(
            "callscribe_engine_errors", "Engine failures reported to legs", ["code"], registry=r
        )
        self.dashboard_clients = Gauge(
            "callscribe_dashboard_clients", "Open dashboard event streams (SSE)", registry=r
        )
        self.dashboard_resumes = Counter(
            "callscribe_dashboard_resumes", "Dashboard event streams resumed from Last-Event-ID", registry=r
        )

    def drop(self, transport: str, reason: str, count: int = 1) -> None:
        self.packets_dropped.labels(transport=transport, reason=reason).inc(count)

    def dropped(self, transport: str, reason: str) -> float:
        """Current value of one drop counter (tests and the soak report read it)."""
        value = self.registry.get_sample_value(
            "callscribe_packets_dropped_total", {"transport": transport, "reason": reason}
        )
        return value or 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
