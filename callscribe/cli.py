"""The `callscribe` command: serve, send, tail, demo."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer

from callscribe.events import EventType, TranscriptEvent
from callscribe.logs import configure_logging

app = typer.Typer(
    help="callscribe turns live phone calls into live text in Redis Streams.",
    no_args_is_help=True,
    add_completion=False,
    # Errors are one line (main() below); a traceback only with --debug.
    pretty_exceptions_enable=False,
)
log = logging.getLogger("callscribe")


@dataclass(frozen=True)
class CliState:
    """What main() found on the command line before typer parsed it."""

    debug: bool = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"callscribe {metadata.version('callscribe')}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="show tracebacks of errors (anywhere on the command line)")
    ] = False,
) -> None:
    """callscribe turns live phone calls into live text in Redis Streams."""


def _default(name: str) -> str:
    """A setting's default, for --help (the options default to None so that env and TOML apply)."""
    from callscribe.settings import Settings

    field = Settings.model_fields[name]
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is None or value == []:
        return "unset"
    return str(value).lower() if isinstance(value, bool) else str(value)


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
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option(help="TOML settings file (env CALLSCRIBE_* wins)", show_default=False)
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis URL", show_default=_default("redis_url"))
    ] = None,
    key_prefix: Annotated[
        str | None, typer.Option(help="prefix of every Redis key", show_default=_default("key_prefix"))
    ] = None,
    http_host: Annotated[
        str | None, typer.Option(help="HTTP bind address", show_default=_default("http_host"))
    ] = None,
    http_port: Annotated[
        int | None,
        typer.Option(help="HTTP port (health, legs API, WHIP, forks)", show_default=_default("http_port")),
    ] = None,
    rtp_host: Annotated[
        str | None, typer.Option(help="RTP bind address", show_default=_default("rtp_host"))
    ] = None,
    rtp_port: Annotated[
        int | None, typer.Option(help="auto-leg RTP port", show_default=_default("rtp_port"))
    ] = None,
    rtp_port_range: Annotated[
        str | None,
        typer.Option(help="RTP ports for reserved legs, LOW-HIGH", show_default=_default("rtp_port_range")),
    ] = None,
    rtp_public_host: Annotated[
        str | None,
        typer.Option(help="address handed out for RTP (needed when binding 0.0.0.0)", show_default="unset"),
    ] = None,
    audiosocket_host: Annotated[
        str | None,
        typer.Option(help="AudioSocket bind address", show_default=_default("audiosocket_host")),
    ] = None,
    audiosocket_port: Annotated[
        int | None,
        typer.Option(help="AudioSocket TCP port (0: any free)", show_default=_default("audiosocket_port")),
    ] = None,
    sip: Annotated[
        bool | None,
        typer.Option("--sip/--no-sip", help="SIP and SIPREC listener", show_default=_default("sip_enabled")),
    ] = None,
    sip_host: Annotated[
        str | None, typer.Option(help="SIP bind address", show_default=_default("sip_host"))
    ] = None,
    sip_port: Annotated[
        int | None, typer.Option(help="SIP port, UDP and TCP", show_default=_default("sip_port"))
    ] = None,
    sip_public_host: Annotated[
        str | None, typer.Option(help="address in SIP Contact and SDP", show_default="unset")
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(help="browser origin allowed to use WHIP (repeatable; * for any)", show_default="none"),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="sphinx (embedded CPU), vllm (in process), remote", show_default=_default("engine")
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="model path or name for the vllm engine", show_default="unset")
    ] = None,
    vllm_arg: Annotated[
        list[str] | None,
        typer.Option(help="extra vLLM engine argument KEY=VALUE (repeatable)", show_default="none"),
    ] = None,
    vllm_url: Annotated[
        list[str] | None,
        typer.Option(help="vllm serve replica for engine remote (repeatable)", show_default="none"),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(help="debug, info, warning, error", show_default=_default("log_level")),
    ] = None,
    log_json: Annotated[
        bool | None, typer.Option("--log-json/--log-text", help="JSON log lines", show_default="text")
    ] = None,
    drain_timeout: Annotated[float, typer.Option(help="seconds to flush open legs on SIGTERM")] = 30.0,
) -> None:
    """Run the bridge: RTP and HTTP ingest, the engine and the Redis publisher."""
    from callscribe.engine.base import EngineUnavailable
    from callscribe.settings import ConfigError, check_public_address, load_settings, unknown_env_settings

    debug = isinstance(ctx.obj, CliState) and ctx.obj.debug
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
            rtp_public_host=rtp_public_host,
            audiosocket_host=audiosocket_host,
            audiosocket_port=audiosocket_port,
            sip_enabled=sip,
            sip_host=sip_host,
            sip_port=sip_port,
            sip_public_host=sip_public_host,
            cors_origins=cors_origin or None,
            engine=engine,
            model=model,
            vllm_args=parse_vllm_args(vllm_arg) if vllm_arg else None,
            vllm_urls=vllm_url or None,
            log_level=log_level,
            log_json=log_json,
        )
        check_public_address(settings)
    except ConfigError as exc:
        raise fail(f"bad configuration: {exc}") from None
    configure_logging(settings.log_level, settings.log_json)
    for warning in unknown_env_settings(os.environ):
        log.warning("%s", warning)
    try:
        asyncio.run(_serve(settings, drain_timeout))
    except EngineUnavailable as exc:
        if debug:
            raise
        raise fail(
            f"engine {settings.engine} unavailable: {exc} (--engine or CALLSCRIBE_ENGINE)", 1
        ) from None
    except OSError as exc:
        if debug:
            raise
        raise fail(f"cannot start: {exc}", 1) from None


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
        if starting.exception() is not None:
            # The engine's worker processes were started before a listener failed: stop them,
            # or they outlive this process (holding its stderr open) after the one-line error.
            with contextlib.suppress(Exception):
                await service.engine.close()
            with contextlib.suppress(Exception):
                await service.publisher.close()
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
    file: Annotated[
        Path, typer.Argument(help="WAV file to send (16-bit PCM or G.711)", exists=True, dir_okay=False)
    ],
    to: Annotated[str, typer.Option("--to", help="destination HOST:PORT")],
    codec: Annotated[
        str, typer.Option(help="pcmu, pcma, g722, opus, l16, l16-8k, l16-16k, l16-44k, l16-48k")
    ] = "pcmu",
    ptime: Annotated[int, typer.Option(help="packet time in ms")] = 20,
    speed: Annotated[float, typer.Option(help="1.0 = real time, 2.0 = twice as fast")] = 1.0,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="progress line (default: on a terminal)")
    ] = None,
) -> None:
    """Send a WAV file as one RTP stream, paced in real time, ended by RTCP BYE."""
    from callscribe.bridge.rtp.sender import datagram_warning, send_codec, send_wav
    from callscribe.codecs.base import CodecError

    host, port = parse_host_port(to)
    if speed <= 0:
        raise fail("--speed must be positive")
    if ptime <= 0:
        raise fail("--ptime must be a positive number of ms")
    try:
        spec = send_codec(codec)
    except CodecError as exc:
        raise fail(str(exc)) from None
    if warning := datagram_warning(spec, ptime):
        typer.secho(f"callscribe: warning: {warning}", err=True, fg=typer.colors.YELLOW)
    show = sys.stderr.isatty() if progress is None else progress
    report = _progress_line(file.name, ptime) if show else None
    try:
        stats = asyncio.run(
            send_wav(file, host, port, codec=codec, ptime_ms=ptime, speed=speed, progress=report)
        )
    except (CodecError, ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    finally:
        if show:
            sys.stderr.write("\n")
    typer.echo(f"sent {stats}; ended with RTCP BYE", err=True)


def _progress_line(name: str, ptime_ms: int) -> Callable[[int, int], None]:
    """One line on stderr rewritten in place: what is sent of how much."""

    def report(sent: int, total: int) -> None:
        done = sent * ptime_ms / 1000
        whole = total * ptime_ms / 1000
        percent = 100 * sent // total if total else 100
        sys.stderr.write(f"\rsending {name}: {done:6.1f}/{whole:.1f} s ({percent:3d}%)")
        sys.stderr.flush()

    return report


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
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from callscribe.settings import REDIS_URL_SCHEMES, redact_url

    if not redis_url.startswith(REDIS_URL_SCHEMES):
        raise fail(f"--redis-url {redis_url!r} is not a Redis URL like redis://127.0.0.1:6379/0")
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_tail(redis_url, key_prefix, call_id, "0-0" if from_start else "$", partials))
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise fail(
            f"Redis is not reachable at {redact_url(redis_url)} ({reason}); "
            "start it or pass --redis-url / CALLSCRIBE_REDIS_URL",
            1,
        ) from None


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
    """The console script: `--debug` anywhere on the line shows tracebacks; without it an
    unexpected error is one line and exit code 1."""
    argv = sys.argv[1:]
    debug = "--debug" in argv
    args = [arg for arg in argv if arg != "--debug"]
    try:
        app(args=args, obj=CliState(debug=debug), prog_name="callscribe")
    except Exception as exc:
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        typer.secho(
            f"callscribe: unexpected error: {type(exc).__name__}: {first} "
            "(run with --debug for the traceback)",
            err=True,
            fg=typer.colors.RED,
        )
        sys.exit(1)
