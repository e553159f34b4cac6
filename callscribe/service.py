"""The composition root: one asyncio process running ingest, engine, publishing and HTTP.

`async with Service(settings) as service:` starts everything and stops it in reverse order,
draining open legs (their last finals are published) before the publisher flushes.
Ingest servers other than HTTP are `Component`s: anything with async start()/stop().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Generator
from typing import Any, Protocol

import uvicorn
from starlette.routing import BaseRoute

from callscribe.calls import CallRegistry
from callscribe.engine.base import Engine
from callscribe.listeners import bind_http_socket, component_listen_error
from callscribe.metrics import Metrics
from callscribe.publish.redis_streams import RedisStreamsPublisher
from callscribe.security import AccessPolicy
from callscribe.settings import Settings, redact_url

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
        self.engine = engine or create_engine(settings)
        self.publisher = RedisStreamsPublisher(settings, self.metrics)
        self.registry = CallRegistry(self.engine, self.publisher, self.metrics)
        self.components: list[Component] = []
        # Feature modules (websocket forks, WHIP, dashboard) add their routes here before start().
        self.route_factories: list[Callable[[Service], list[BaseRoute]]] = []
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[Any] | None = None
        self._ready_task: asyncio.Task[None] | None = None
        # What start() or stop() is doing now: named in the log when a signal or timeout hits.
        self.phase = "not started"

    @property
    def http_port(self) -> int:
        """The bound HTTP port (differs from settings when settings ask for port 0)."""
        if self._http is not None and self._http.servers:
            sockets = self._http.servers[0].sockets
            if sockets:
                return int(sockets[0].getsockname()[1])
        return self.settings.http_port

    async def start(self) -> None:
        from callscribe.bridge.udp import RtpIngest
        from callscribe.web.app import create_app

        # The HTTP port first: a taken port fails the start at once, not after the engine loaded.
        http_socket = bind_http_socket(self.settings)
        self.phase = "connecting to Redis"
        await self.publisher.start()
        self.phase = f"starting the {self.engine.name} engine"
        await self.engine.start()
        self.phase = "opening ingest"
        self.rtp = RtpIngest(self.settings, self.registry, self.metrics, self.policy)
        self.components.append(self.rtp)
        if self.settings.sip_enabled:
            from callscribe.bridge.sip_transport import SipServer

            self.sip = SipServer(self.settings, self.rtp, self.metrics, self.policy, self.registry)
            self.components.append(self.sip)
        self._add_webrtc_and_dashboard()
        self._add_media_forks()
        for component in self.components:
            try:
                await component.start()
            except OSError as exc:
                http_socket.close()
                raise component_listen_error(component, self.settings, exc) from exc
        config = uvicorn.Config(
            create_app(self),
            host=self.settings.http_host,
            port=self.settings.http_port,
            log_level="warning",
            lifespan="off",
            # Dashboard event streams and fork websockets are long-lived: don't wait on them
            # at shutdown (the legs were drained before the HTTP server is asked to stop).
            timeout_graceful_shutdown=5,
        )
        self._http = _EmbeddedHttpServer(config)
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

    def _add_webrtc_and_dashboard(self) -> None:
        from callscribe.bridge.webrtc import WhipIngest
        from callscribe.web.dashboard import Dashboard, dashboard_routes
        from callscribe.web.whip import whip_routes

        self.whip = WhipIngest(self.registry, self.metrics, self.settings.leg_idle_timeout_sec)
        self.dashboard = Dashboard(self.settings, self.metrics)
        self.components += [self.whip, self.dashboard]
        self.route_factories += [whip_routes, dashboard_routes]

    def _add_media_forks(self) -> None:
        from callscribe.bridge.audiosocket import AudioSocketServer
        from callscribe.web.forks import fork_routes

        self.audiosocket = AudioSocketServer(self.settings, self.registry, self.metrics, self.policy)
        self.components.append(self.audiosocket)
        self.route_factories.append(fork_routes)

    async def stop(self, drain_timeout: float = 30.0) -> None:
        self.registry.accepting = False
        if self._ready_task is not None:
            self._ready_task.cancel()

        async def drain() -> None:
            # Ingest components end their own legs first: they hold audio not yet fed
            # (jitter buffers, batches) that belongs in the last finals.
            for component in reversed(self.components):
                await component.stop()
            await self.registry.close_all("shutdown")

        self.phase = "draining legs"
        try:
            await asyncio.wait_for(drain(), drain_timeout)
        except TimeoutError:
            log.error("drain timed out after %.0fs; %d legs cut", drain_timeout, len(self.registry.legs))
        if self._http is not None and self._http_task is not None:
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
        return self.engine.ready and self.publisher.connected

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
