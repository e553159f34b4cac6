"""The `callscribe` command: serve, send, tail, demo."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from callscribe.events import EventType, TranscriptEvent
from callscribe.logs import configure_logging

app = typer.Typer(
    help="callscribe turns live phone calls into live text in Redis Streams.",
    no_args_is_help=True,
    add_completion=False,
)
log = logging.getLogger("callscribe")


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"callscribe: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def parse_vllm_args(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is JSON when it parses (numbers, booleans, objects), else a string."""
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--vllm-arg {pair!r} must be KEY=VALUE")
        try:
            args[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            args[key.replace("-", "_")] = raw
    return args


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(help="TOML settings file (env CALLSCRIBE_* wins)")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL, e.g. redis://127.0.0.1:6379/0")] = None,
    key_prefix: Annotated[str | None, typer.Option(help="prefix of every Redis key")] = None,
    http_host: Annotated[str | None, typer.Option(help="HTTP bind address")] = None,
    http_port: Annotated[
        int | None, typer.Option(help="HTTP port (health, legs API, metrics, forks)")
    ] = None,
    rtp_host: Annotated[str | None, typer.Option(help="RTP bind address")] = None,
    rtp_port: Annotated[int | None, typer.Option(help="auto-leg RTP port")] = None,
    rtp_port_range: Annotated[str | None, typer.Option(help="RTP ports for reserved legs, LOW-HIGH")] = None,
    engine: Annotated[
        str | None, typer.Option(help="sphinx (embedded CPU), vllm (in process), remote")
    ] = None,
    model: Annotated[str | None, typer.Option(help="model path or name for the vllm engine")] = None,
    vllm_arg: Annotated[
        list[str] | None, typer.Option(help="extra vLLM engine argument KEY=VALUE (repeatable)")
    ] = None,
    vllm_url: Annotated[
        list[str] | None, typer.Option(help="vllm serve replica for engine remote (repeatable)")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error")] = None,
    drain_timeout: Annotated[float, typer.Option(help="seconds to flush open legs on SIGTERM")] = 30.0,
) -> None:
    """Run the bridge: RTP and HTTP ingest, the engine and the Redis publisher."""
    from pydantic import ValidationError

    from callscribe.engine.base import EngineUnavailable
    from callscribe.settings import load_settings

    try:
        settings = load_settings(
            config,
            redis_url=redis_url,
            key_prefix=key_prefix,
            http_host=http_host,
            http_port=http_port,
            rtp_host=rtp_host,
            rtp_port=rtp_port,
            rtp_port_range=rtp_port_range,
            engine=engine,
            model=model,
            vllm_args=parse_vllm_args(vllm_arg) if vllm_arg else None,
            vllm_urls=vllm_url or None,
            log_level=log_level,
        )
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        raise fail(f"bad configuration: {exc}") from None
    configure_logging(settings.log_level, settings.log_json)
    try:
        asyncio.run(_serve(settings, drain_timeout))
    except EngineUnavailable as exc:
        raise fail(f"engine {settings.engine} unavailable: {exc}") from None
    except OSError as exc:
        raise fail(f"cannot start: {exc}") from None


# After the drain timeout, this long for the HTTP server, engine and publisher to close.
SHUTDOWN_GRACE_S = 15.0


async def _serve(settings: Any, drain_timeout: float) -> None:
    from callscribe.service import Service

    service = Service(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        if stop.is_set():
            log.error("%s again: exiting now, without finishing the shutdown (%s)", name, service.phase)
            os._exit(1)
        log.info("%s received", name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    # A signal while starting (a slow engine load, an unreachable dependency) stops the start.
    starting = loop.create_task(service.start())
    signalled = loop.create_task(stop.wait())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        starting.result()  # start errors end the process here, with their own message
        await signalled
    else:
        log.warning("stopping while still starting (%s)", service.phase)
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting

    def give_up() -> None:
        # SIGTERM must end the process within its budget even if a dependency hangs.
        log.error(
            "shutdown not done %.0f s after the drain timeout (stuck %s); exiting",
            SHUTDOWN_GRACE_S,
            service.phase,
        )
        os._exit(1)

    loop.call_later(drain_timeout + SHUTDOWN_GRACE_S, give_up)
    log.info("stopping: draining %d open legs (timeout %.0fs)", len(service.registry.legs), drain_timeout)
    await service.stop(drain_timeout=drain_timeout)
    log.info("stopped")


@app.command()
def send(
    file: Annotated[Path, typer.Argument(help="WAV file to send", exists=True, dir_okay=False)],
    to: Annotated[str, typer.Option("--to", help="destination HOST:PORT")],
    codec: Annotated[str, typer.Option(help="pcmu, pcma, opus, l16, g722 ...")] = "pcmu",
    ptime: Annotated[int, typer.Option(help="packet time in ms")] = 20,
    speed: Annotated[float, typer.Option(help="1.0 = real time, 2.0 = twice as fast")] = 1.0,
) -> None:
    """Send a WAV file as one RTP stream, paced in real time (a test peer, and a tool for users)."""
    from callscribe.bridge.rtp.sender import send_wav
    from callscribe.codecs.base import CodecError

    host, port = parse_host_port(to)
    if speed <= 0:
        raise fail("--speed must be positive")
    try:
        stats = asyncio.run(send_wav(file, host, port, codec=codec, ptime_ms=ptime, speed=speed))
    except (CodecError, ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"sent {stats}", err=True)


def format_event(event: TranscriptEvent) -> str:
    def span() -> str:
        if event.start_ms is None or event.end_ms is None:
            return ""
        return f"[{event.start_ms / 1000:6.2f}-{event.end_ms / 1000:6.2f}s] "

    who = f"{event.call_id}/{event.leg}" if event.leg else event.call_id
    if event.type == EventType.PARTIAL:
        tail = typer.style(event.unstable, dim=True)
        return f"  partial {who} #{event.utt} {span()}{event.stable} {tail}"
    if event.type == EventType.FINAL:
        latency = f"  ({event.latency_ms} ms)" if event.latency_ms is not None else ""
        return typer.style(f"FINAL   {who} #{event.utt} {span()}{event.text}{latency}", bold=True)
    if event.type == EventType.DTMF:
        return f"DTMF    {who} {span()}{event.text}"
    extra = f" {json.dumps(event.meta)}" if event.meta else ""
    return typer.style(f"{event.type:<7} {who}{extra}", fg=typer.colors.CYAN)


@app.command()
def tail(
    call_id: Annotated[
        str | None, typer.Option(help="follow one call (default: every call that starts)")
    ] = None,
    redis_url: Annotated[str, typer.Option(envvar="CALLSCRIBE_REDIS_URL")] = "redis://127.0.0.1:6379/0",
    key_prefix: Annotated[str, typer.Option(envvar="CALLSCRIBE_KEY_PREFIX")] = "callscribe",
    from_start: Annotated[bool, typer.Option(help="replay the stream from its beginning")] = False,
    partials: Annotated[bool, typer.Option(help="show partial hypotheses")] = True,
) -> None:
    """Print transcript events from Redis as they arrive."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_tail(redis_url, key_prefix, call_id, "0-0" if from_start else "$", partials))


async def _tail(redis_url: str, prefix: str, call_id: str | None, start: str, partials: bool) -> None:
    from callscribe.publish.connect import connect
    from callscribe.publish.tail import follow

    client = connect(redis_url)
    try:
        async for _entry_id, event in follow(client, prefix, call_id=call_id, start=start):
            if partials or event.type != EventType.PARTIAL:
                typer.echo(format_event(event))
    finally:
        await client.aclose()


@app.command()
def demo(
    clip: Annotated[Path | None, typer.Option(help="WAV to send (default: the bundled test call)")] = None,
    redis_url: Annotated[str, typer.Option(envvar="CALLSCRIBE_REDIS_URL")] = "redis://127.0.0.1:6379/0",
    speed: Annotated[float, typer.Option(help="1.0 = real time")] = 1.0,
    codec: Annotated[str, typer.Option(help="RTP codec of the demo call")] = "pcmu",
) -> None:
    """Start the bridge, send a recorded call over RTP, print its transcript from Redis."""
    from callscribe.demo import default_clip, run_demo

    path = clip or default_clip()
    if path is None or not path.is_file():
        raise fail("no demo clip found; pass --clip FILE.wav")
    configure_logging("warning")
    try:
        asyncio.run(
            run_demo(path, redis_url=redis_url, speed=speed, codec=codec, echo=typer.echo, fmt=format_event)
        )
    except RuntimeError as exc:
        raise fail(str(exc), 1) from None


def main() -> None:
    app()
