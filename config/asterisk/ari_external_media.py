#!/usr/bin/env python3
"""Transcribe live Asterisk calls with callscribe through ARI ExternalMedia (RTP).

For every channel that enters the Stasis application `callscribe` (see extensions.conf,
[callscribe-ari]) this script:
  1. asks callscribe for two RTP ports: POST /v1/legs {"call_id", "leg": "caller"|"agent"},
  2. snoops the channel twice (spy=in: what the caller says; spy=out: what the caller hears,
     the agent side), bridges each snoop with an ExternalMedia channel that sends μ-law RTP
     to the port callscribe gave,
  3. sends the channel on to the dialplan ([callscribe-continue]) so the call goes ahead
     (also when forking failed: the call then goes on untranscribed),
  4. when the channel hangs up (the script subscribes to it, so ChannelDestroyed arrives after
     it has left Stasis), tears the snoops down and DELETEs the legs (their last finals are
     published before callscribe answers 204).

ExternalMedia RTP has no call id on the wire: callscribe knows each leg by the port it handed
out. Needs only the Python standard library and `websockets` (installed with callscribe).

    CALLSCRIBE_URL=http://127.0.0.1:8080 CALLSCRIBE_API_TOKEN=... ARI_URL=http://127.0.0.1:8088 \
    ARI_USER=callscribe ARI_PASSWORD=change-me python3 ari_external_media.py

CALLSCRIBE_API_TOKEN is callscribe's `api_token` (sent as a bearer token on /v1/legs); leave
it unset when callscribe runs without one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect

CALLSCRIBE = os.environ.get("CALLSCRIBE_URL", "http://127.0.0.1:8080")
CALLSCRIBE_TOKEN = os.environ.get("CALLSCRIBE_API_TOKEN") or None
ARI = os.environ.get("ARI_URL", "http://127.0.0.1:8088")
ARI_USER = os.environ.get("ARI_USER", "callscribe")
ARI_PASSWORD = os.environ.get("ARI_PASSWORD", "change-me")
APP = os.environ.get("ARI_APP", "callscribe")
CONTINUE_CONTEXT = os.environ.get("ARI_CONTINUE_CONTEXT", "callscribe-continue")
# Channels this script creates enter Stasis with this argument and are not transcribed.
INTERNAL = "callscribe-internal"
DIRECTIONS = (("caller", "in"), ("agent", "out"))

log = logging.getLogger("callscribe-ari")


def http(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    auth: str | None = None,
    bearer: str | None = None,
) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    elif bearer:
        request.add_header("Authorization", f"Bearer {bearer}")
    with urllib.request.urlopen(request, timeout=10) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


def callscribe(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    return http(method, f"{CALLSCRIBE}/v1/{path}", body, bearer=CALLSCRIBE_TOKEN)


def ari(method: str, path: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    return http(
        method, f"{ARI}/ari/{path}" + (f"?{query}" if query else ""), auth=f"{ARI_USER}:{ARI_PASSWORD}"
    )


@dataclass
class Transcription:
    channel_id: str
    leg_ids: list[str] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)
    bridges: list[str] = field(default_factory=list)


class InStasis:
    """The channels this script created that have entered the application. A snoop channel
    exists as soon as POST /snoop answers but reaches Stasis a moment later (its StasisStart),
    and a bridge refuses it until then (422)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arrived: dict[str, threading.Event] = {}

    def _event(self, channel_id: str) -> threading.Event:
        with self._lock:
            return self._arrived.setdefault(channel_id, threading.Event())

    def arrived(self, channel_id: str) -> None:
        self._event(channel_id).set()

    def wait(self, channel_id: str, timeout: float = 10.0) -> None:
        try:
            if not self._event(channel_id).wait(timeout):
                raise TimeoutError(f"channel {channel_id} did not enter Stasis({APP}) in {timeout:.0f} s")
        finally:
            with self._lock:
                self._arrived.pop(channel_id, None)


def start(channel: dict[str, Any], in_stasis: InStasis) -> Transcription | None:
    """Fork both directions of the channel to callscribe, then let the call go on. If that
    fails the call still goes on, untranscribed: a transcriber must not hold up a call."""
    call_id = channel["id"]
    meta = {
        "caller": channel.get("caller", {}).get("number", ""),
        "exten": channel.get("dialplan", {}).get("exten", ""),
    }
    job = Transcription(call_id)
    started: Transcription | None = job
    try:
        for leg, spy in DIRECTIONS:
            reserved = callscribe(
                "POST", "legs", {"call_id": call_id, "leg": leg, "codec": "pcmu", "meta": meta}
            )
            job.leg_ids.append(reserved["leg_id"])
            snoop = ari(
                "POST", f"channels/{call_id}/snoop", spy=spy, whisper="none", app=APP, appArgs=INTERNAL
            )
            job.channels.append(snoop["id"])
            media = ari(
                "POST",
                "channels/externalMedia",
                app=APP,
                data=INTERNAL,
                external_host=f"{reserved['rtp_host']}:{reserved['rtp_port']}",
                format="ulaw",
                encapsulation="rtp",
                transport="udp",
                direction="both",
            )
            job.channels.append(media["id"])
            bridge = ari("POST", "bridges", type="mixing", name=f"callscribe-{call_id}-{leg}")
            job.bridges.append(bridge["id"])
            in_stasis.wait(snoop["id"])
            in_stasis.wait(media["id"])
            ari("POST", f"bridges/{bridge['id']}/addChannel", channel=f"{snoop['id']},{media['id']}")
            log.info("call %s leg %s → %s:%s", call_id, leg, reserved["rtp_host"], reserved["rtp_port"])
        # Once the channel leaves Stasis (continue), the application stops hearing about it
        # unless it subscribes: without this, its ChannelDestroyed never arrives and the legs
        # end only by callscribe's idle timeout.
        ari("POST", f"applications/{APP}/subscription", eventSource=f"channel:{call_id}")
    except Exception:
        log.exception("could not transcribe %s; the call goes on without it", call_id)
        stop(job)
        started = None
    exten = channel.get("dialplan", {}).get("exten", "s")
    try:
        ari("POST", f"channels/{call_id}/continue", context=CONTINUE_CONTEXT, extension=exten, priority="1")
    except Exception as exc:  # e.g. the caller hung up meanwhile
        log.warning("call %s: could not continue in the dialplan: %s", call_id, exc)
    return started


def stop(job: Transcription) -> None:
    for channel_id in job.channels:
        with contextlib.suppress(Exception):  # already gone with the call
            ari("DELETE", f"channels/{channel_id}")
    for bridge_id in job.bridges:
        with contextlib.suppress(Exception):
            ari("DELETE", f"bridges/{bridge_id}")
    for leg_id in job.leg_ids:
        try:
            callscribe("DELETE", f"legs/{leg_id}")  # returns once the last final is out
        except Exception as exc:
            log.warning("leg %s: %s", leg_id, exc)
    log.info("call %s done", job.channel_id)


async def transcribe(channel: dict[str, Any], in_stasis: InStasis, hung_up: dict[str, asyncio.Event]) -> None:
    """One call: start in a thread (blocking HTTP), then stop once the channel is destroyed."""
    ended = hung_up[channel["id"]]
    job = await asyncio.to_thread(start, channel, in_stasis)
    if job is None:  # not subscribed: its ChannelDestroyed may never come
        hung_up.pop(channel["id"], None)
        return
    await ended.wait()
    await asyncio.to_thread(stop, job)


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    events_url = (
        ARI.replace("http", "ws", 1)
        + "/ari/events?"
        + urllib.parse.urlencode({"app": APP, "api_key": f"{ARI_USER}:{ARI_PASSWORD}"})
    )
    in_stasis = InStasis()
    hung_up: dict[str, asyncio.Event] = {}
    calls: set[asyncio.Task[None]] = set()
    async with connect(events_url) as events:
        log.info("listening for calls in Stasis(%s)", APP)
        # Events keep being read while calls start and stop: starting waits for some of them.
        async for message in events:
            event = json.loads(message)
            kind, channel = event.get("type"), event.get("channel") or {}
            channel_id = channel.get("id", "")
            if kind == "StasisStart" and INTERNAL in event.get("args", []):
                in_stasis.arrived(channel_id)
            elif kind == "StasisStart" and channel_id not in hung_up:
                hung_up[channel_id] = asyncio.Event()
                task = asyncio.create_task(transcribe(channel, in_stasis, hung_up))
                calls.add(task)
                task.add_done_callback(calls.discard)
            elif kind == "ChannelDestroyed" and channel_id in hung_up:
                hung_up.pop(channel_id).set()


if __name__ == "__main__":
    asyncio.run(main())
