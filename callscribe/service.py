"""The composition root: one asyncio process running ingest, engine, publishing and HTTP.

`Service(settings)` builds every part (engine, publisher, registry, each ingest, the HTTP app)
and does no I/O; `async with service:` (or start()) starts them in order and stops them in
reverse, draining open legs (their last finals are published) before the publisher flushes.
Ingest servers other than HTTP are `Component`s: anything with async start()/stop(). Each
part gets only what it uses: nothing but this module sees the whole Service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Generator
from typing import Any, Protocol

import uvicorn

from callscribe.bridge.audiosocket.server import AudioSocketServer
from callscribe.bridge.events import EndReason
from callscribe.bridge.rtp.ingest import RtpIngest
from callscribe.bridge.sip.server import SipServer
from callscribe.bridge.webrtc import WhipIngest
from callscribe.calls import CallRegistry
from callscribe.engine.base import Engine
from callscribe.listeners import bind_http_socket, component_listen_error
from callscribe.metrics import Metrics
from callscribe.publish.redis_streams import RedisStreamsPublisher
from callscribe.redact import Redactor, parse_redactions
from callscribe.security import AccessPolicy
from callscribe.settings import Settings, redact_url
from callscribe.web.app import create_app, health_routes, leg_routes
from callscribe.web.dashboard import Dashboard, dashboard_routes
from callscribe.web.forks import fork_routes
from callscribe.web.http_limits import http_limits
from callscribe.web.supervisor import supervisor_routes
from callscribe.web.whip import whip_routes

log = logging.getLogger(__name__)


class Component(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def create_engine(settings: Settings) -> Engine:
    """The configured engine; heavy imports happen only for the engine chosen."""
    if settings.engine == "sphinx":
        from callscribe.engine.sphinx import SphinxEngine

        return SphinxEngine(language=settings.language)
    if settings.engine == "vllm":
        from callscribe.engine.qwen3.local import LocalQwen3Engine

        return LocalQwen3Engine.from_settings(settings)
    if settings.engine == "remote":
        from callscribe.engine.qwen3.remote import RemoteQwen3Engine

        return RemoteQwen3Engine.from_settings(settings)
    raise ValueError(f"unknown engine {settings.engine!r}")


class _EmbeddedHttpServer(uvicorn.Server):
    """uvicorn inside the service's loop: SIGTERM belongs to the service (it drains legs
    first), so uvicorn must not install its own handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Service:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        # One policy for every ingest: who may send media or call the API, and with which secret.
        self.policy = AccessPolicy.from_settings(settings)
        self.metrics = Metrics()
        self.engine: Engine = engine or create_engine(settings)
        self.publisher = RedisStreamsPublisher(settings, self.metrics)
        redactor = Redactor(parse_redactions(settings.redact))
        self.registry = CallRegistry(self.engine, self.publisher, self.metrics, redactor=redactor)
        self.rtp = RtpIngest(settings, self.registry, self.metrics, self.policy)
        self.sip: SipServer | None = (
            SipServer(settings, self.rtp, self.metrics, self.policy, self.registry)
            if settings.sip_enabled
            else None
        )
        self.whip = WhipIngest(self.registry, self.metrics, settings.leg_idle_timeout_sec)
        self.dashboard = Dashboard(settings, self.metrics)
        self.audiosocket = AudioSocketServer(settings, self.registry, self.metrics, self.policy)
        # Started in this order, stopped in reverse.
        self.components: tuple[Component, ...] = tuple(
            component
            for component in (self.rtp, self.sip, self.whip, self.dashboard, self.audiosocket)
            if component is not None
        )
        self._started: list[Component] = []
        self.app = create_app(
            health_routes(self.readiness, self.metrics),
            leg_routes(self.rtp, self.registry, self.policy, self.publisher),
            whip_routes(self.whip, self.policy, self.publisher.wait_flushed, settings.http_host),
            dashboard_routes(self.dashboard, self.metrics),
            supervisor_routes(self.dashboard, settings.alert_phrases),
            fork_routes(
                self.registry,
                self.metrics,
                self.policy,
                max_connections_per_source=settings.fork_max_connections_per_source,
                max_frame_bytes=settings.fork_max_frame_bytes,
                start_timeout_sec=settings.fork_start_timeout_sec,
            ),
            cors_origins=settings.cors_origins,
        )
        self._http = _EmbeddedHttpServer(
            uvicorn.Config(
                self.app,
                host=settings.http_host,
                port=settings.http_port,
                log_level="warning",
                lifespan="off",
                # Dashboard event streams and fork websockets are long-lived: don't wait on them
                # at shutdown (the legs were drained before the HTTP server is asked to stop).
                timeout_graceful_shutdown=5,
                **http_limits(settings),
            )
        )
        self._http_task: asyncio.Task[Any] | None = None
        self._ready_task: asyncio.Task[None] | None = None
        # What start() or stop() is doing now: named in the log when a signal or timeout hits.
        self.phase = "not started"

    @property
    def http_port(self) -> int:
        """The bound HTTP port (differs from settings when settings ask for port 0)."""
        # uvicorn sets `servers` only once it listens.
        servers = getattr(self._http, "servers", None)
        if servers:
            sockets = servers[0].sockets
            if sockets:
                return int(sockets[0].getsockname()[1])
        return self.settings.http_port

    def readiness(self) -> dict[str, bool]:
        """What /readyz reports: each dependency the bridge cannot work without."""
        return {"redis": self.publisher.connected, "engine": self.engine.ready}

    async def start(self) -> None:
        # The HTTP port first: a taken port fails the start at once, not after the engine loaded.
        http_socket = bind_http_socket(self.settings)
        self.phase = "connecting to Redis"
        await self.publisher.start()
        self.phase = f"starting the {self.engine.name} engine"
        await self.engine.start()
        self.phase = "opening ingest"
        for component in self.components:
            try:
                await component.start()
            except OSError as exc:
                http_socket.close()
                raise component_listen_error(component, self.settings, exc) from exc
            self._started.append(component)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[http_socket]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
                raise RuntimeError(f"HTTP server did not start on port {self.settings.http_port}")
            await asyncio.sleep(0.02)
        log.info("access %s", self.policy.describe())
        self.phase = "running"
        self._ready_task = asyncio.create_task(self._announce_ready())

    async def _announce_ready(self) -> None:
        """Log "ready" only when /readyz would say so: until Redis answers, say what is awaited."""
        if not self.publisher.connected:
            log.warning(
                "callscribe started, not ready: waiting for Redis at %s (/readyz answers 503 until then)",
                redact_url(self.settings.redis_url),
            )
            while not self.publisher.connected:  # noqa: ASYNC110 (the publisher has no event to wait on)
                await asyncio.sleep(0.2)
        log.info(
            "callscribe ready engine=%s http=%s:%d rtp=%s:%d",
            self.engine.name,
            self.settings.http_host,
            self.http_port,
            self.settings.rtp_host,
            self.settings.rtp_port,
        )

    async def stop(self, drain_timeout: float = 30.0) -> None:
        self.registry.accepting = False
        if self._ready_task is not None:
            self._ready_task.cancel()

        async def drain() -> None:
            # Ingest components end their own legs first: they hold audio not yet fed
            # (jitter buffers, batches) that belongs in the last finals.
            while self._started:
                await self._started.pop().stop()
            await self.registry.close_all(EndReason.SHUTDOWN)

        self.phase = "draining legs"
        try:
            await asyncio.wait_for(drain(), drain_timeout)
        except TimeoutError:
            log.error("drain timed out after %.0fs; %d legs cut", drain_timeout, len(self.registry.legs))
        if self._http_task is not None:
            self.phase = "closing the HTTP server"
            self._http.should_exit = True
            await self._http_task
        self.phase = f"closing the {self.engine.name} engine"
        await self.engine.close()
        self.phase = "flushing events to Redis"
        await self.publisher.close()
        self.phase = "stopped"

    @property
    def ready(self) -> bool:
        return all(self.readiness().values())

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
