"""Real Asterisk (built from source) places calls into a real `callscribe serve` through every
integration config/asterisk/ ships: AudioSocket(), chan_websocket, ARI ExternalMedia with
ari_external_media.py, and a PJSIP trunk with the two-party ChanSpy fork. Each test then hangs
the call up on the PBX and times how long callscribe takes to end the legs.

The speech is played by Asterisk itself: a Local channel's first half runs [lab-caller-phone]
(Playback of a clip), its second half runs the shipped dialplan. Two-party calls dial the
"agent" over SIP to a second transport of the same Asterisk, where [lab-agent-phone] answers
and plays another clip: the call really is two channels bridged, each side its own speaker.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import jiwer
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from callscribe.events import EventType, TranscriptEvent
from tests.fork_senders import assert_heard
from tests.lab.conftest import (
    PYTHON,
    SHIPPED,
    Asterisk,
    CallLog,
    Callscribe,
    ServeFactory,
    leg_events,
    phone_wav,
    shipped,
    wait_script_ready,
)
from tests.support import finals_text, free_port, load_clip

CALLER, AGENT = "librivox-0870", "librivox-0890"
DIGITS = "42"
# The issue's bound: the leg ends this soon after the PBX hangs up (idle timeout is 10 s).
HANGUP_BUDGET_S = 2.0
TWO_PARTY = ("caller", "agent")
# pytest's record_property: the figures scripts/test-lab.sh prints.
Record = Callable[[str, object], None]


def distinctive(clip: str, other: str) -> set[str]:
    """Words of `clip` long enough not to be filler and absent from `other`."""
    mine, theirs = load_clip(clip).reference.split(), set(load_clip(other).reference.split())
    return {word for word in mine if len(word) >= 6 and word not in theirs}


def lab_dialplan(folder: Path, with_agent: bool) -> str:
    """extensions.conf of the lab: the shipped dialplans included as the files tell users to,
    plus the phones that talk."""
    caller = phone_wav(CALLER, folder)
    agent = phone_wav(AGENT, folder) if with_agent else None
    text = f"""[general]
static = yes
writeprotect = no

#include "callscribe/extensions.conf"
#include "callscribe/extensions_callscribe.conf"

; The caller: speaks once answered, then presses {DIGITS} and stays on the line.
[lab-caller-phone]
exten => s,1,Wait(1)
 same => n,Playback({caller})
 same => n,SendDTMF({DIGITS})
 same => n,Set(DB(lab/caller)=played)
 same => n,Wait(600)
"""
    if agent is not None:
        text += f"""
; The agent's phone (SIP endpoint agentline): answers, speaks, stays on the line.
[lab-agent-phone]
exten => agent,1,Answer()
 same => n,Wait(1)
 same => n,Playback({agent})
 same => n,Set(DB(lab/agent)=played)
 same => n,Wait(600)
"""
    return text


def lab_pjsip(pbx_port: int, agent_port: int, include_trunk: bool) -> str:
    """pjsip.conf of the lab: the UDP transport the shipped trunk names, and the agent's line
    (PJSIP/200 rings a second transport of this Asterisk, identified as endpoint agentline)."""
    text = f"""[transport-udp]
type = transport
protocol = udp
bind = 127.0.0.1:{pbx_port}

[transport-agent]
type = transport
protocol = udp
bind = 127.0.0.1:{agent_port}

[200]
type = endpoint
transport = transport-udp
context = lab-nowhere
disallow = all
allow = ulaw
aors = 200
from_user = agentline
direct_media = no

[200]
type = aor
contact = sip:agent@127.0.0.1:{agent_port}

[agentline]
type = endpoint
transport = transport-agent
context = lab-agent-phone
disallow = all
allow = ulaw
direct_media = no
"""
    if include_trunk:
        text += '\n#include "callscribe/pjsip_callscribe.conf"\n'
    return text


def shipped_dialplan(asterisk: Asterisk, audiosocket_port: int = 9092) -> None:
    asterisk.write(
        "callscribe/extensions.conf",
        shipped("extensions.conf", {"127.0.0.1:9092": f"127.0.0.1:{audiosocket_port}"}),
    )
    asterisk.write("callscribe/extensions_callscribe.conf", shipped("extensions_callscribe.conf"))


def heard(events: list[TranscriptEvent], leg: str, clip: str, record: Record, tag: str) -> str:
    text = finals_text(events, leg)
    reference = load_clip(clip).reference
    wer = float(jiwer.wer(reference, text)) if text else 1.0
    record(f"wer_{tag}", f"{wer:.2f}")
    assert_heard(text, reference)
    return text


def ended_promptly(
    events: list[TranscriptEvent], hung_up_at: float, reasons: set[str], record: Record, tag: str
) -> None:
    ended = [e for e in events if e.type == EventType.LEG_ENDED]
    assert ended, "no leg.ended"
    for event in ended:
        latency = event.ts / 1000 - hung_up_at
        record(f"hangup_to_leg_ended_s_{tag}_{event.leg}", f"{latency:.3f}")
        assert event.meta["reason"] in reasons, f"leg {event.leg} ended with {event.meta}, expected {reasons}"
        assert latency <= HANGUP_BUDGET_S, f"leg {event.leg} ended {latency:.2f} s after the hangup"


async def place_call(
    asterisk: Asterisk, call_log: CallLog, destination: str, legs: tuple[str, ...] = ("caller",)
) -> tuple[float, dict[str, list[TranscriptEvent]]]:
    """Originate `destination` from the lab's caller phone, wait until each leg's phone has
    played its clip and callscribe has settled, hang up and wait for every leg.ended:
    (the hang-up time, the calls seen)."""
    await asterisk.acli(f"channel originate {destination} extension s@lab-caller-phone")
    for leg in legs:
        await asterisk.wait_db("lab", leg)
    await call_log.wait_settled(legs=len(legs))
    hung_up_at = await asterisk.hangup_all()
    calls = await call_log.wait(lambda c: len(leg_events(c, EventType.LEG_ENDED)) >= len(legs), "leg.ended")
    return hung_up_at, calls


async def test_audiosocket_from_a_local_channel(
    asterisk: Asterisk, serve: ServeFactory, call_log: CallLog, tmp_path: Path, record_property: Record
) -> None:
    bridge = await serve()
    asterisk.write("extensions.conf", lab_dialplan(tmp_path, with_agent=False))
    shipped_dialplan(asterisk, bridge.audiosocket_port)
    asterisk.start()

    hung_up_at, calls = await place_call(asterisk, call_log, "Local/100@callscribe-audiosocket")

    assert len(calls) == 1, f"one call expected, got {list(calls)}"
    [(call_id, events)] = calls.items()
    assert re.fullmatch(r"[0-9a-f-]{36}", call_id), f"call id {call_id!r} is not the dialplan's UUID()"
    started = [e for e in events if e.type == EventType.LEG_STARTED]
    assert [(e.leg, e.meta["source"]) for e in started] == [("caller", "audiosocket")]
    assert [e.text for e in events if e.type == EventType.DTMF] == list(DIGITS)
    heard(events, "caller", CALLER, record_property, "audiosocket")
    ended_promptly(events, hung_up_at, {"hangup"}, record_property, "audiosocket")


@pytest.mark.parametrize("auth", [False, True], ids=["open", "basic-auth"])
async def test_chan_websocket_dial(
    asterisk: Asterisk,
    serve: ServeFactory,
    call_log: CallLog,
    tmp_path: Path,
    record_property: Record,
    auth: bool,
) -> None:
    token = secrets.token_urlsafe(16)
    bridge = await serve(**({"CALLSCRIBE_FORK_AUTH_TOKEN": token} if auth else {}))
    client = {"ws://127.0.0.1:8080/": f"ws://127.0.0.1:{bridge.http_port}/"}
    if auth:
        # The shipped file carries the credentials commented out, for exactly this setting.
        client |= {
            "; username = asterisk": "username = asterisk",
            "; password = change-me": f"password = {token}",
        }
        with pytest.raises(InvalidStatus) as refused:  # the token really is required
            async with connect(f"ws://127.0.0.1:{bridge.http_port}/fork/asterisk", subprotocols=["media"]):  # type: ignore[list-item]
                pass
        assert refused.value.response.status_code in (401, 403)
    asterisk.write("websocket_client.conf", shipped("websocket_client.conf", client))
    asterisk.write("chan_websocket.conf", shipped("chan_websocket.conf"))
    asterisk.write("extensions.conf", lab_dialplan(tmp_path, with_agent=False))
    shipped_dialplan(asterisk)
    asterisk.start()

    hung_up_at, calls = await place_call(asterisk, call_log, "Local/300@callscribe-websocket")

    assert len(calls) == 1, f"one call expected, got {list(calls)}"
    [(call_id, events)] = calls.items()
    # v(call_id=${UNIQUEID},leg=caller) named the call: an Asterisk unique id, not the channel's.
    assert re.fullmatch(r"\d+\.\d+", call_id), call_id
    [started] = [e for e in events if e.type == EventType.LEG_STARTED]
    assert started.leg == "caller" and started.meta["source"] == "asterisk-websocket"
    assert started.meta["channel"].startswith("WebSocket/callscribe"), started.meta
    assert started.meta["channel_id"] != call_id
    assert [e.text for e in events if e.type == EventType.DTMF] == list(DIGITS)
    tag = "websocket_auth" if auth else "websocket"
    heard(events, "caller", CALLER, record_property, tag)
    ended_promptly(events, hung_up_at, {"hangup"}, record_property, tag)


async def test_ari_external_media_two_party_call(
    asterisk: Asterisk, serve: ServeFactory, call_log: CallLog, tmp_path: Path, record_property: Record
) -> None:
    api_token, ari_password = secrets.token_urlsafe(16), secrets.token_urlsafe(12)
    bridge = await serve(CALLSCRIBE_API_TOKEN=api_token)
    async with httpx.AsyncClient(timeout=5) as http:  # the token really is required
        assert (await http.get(f"{bridge.url}/v1/legs")).status_code == 401
    ari_port, pbx_port, agent_port = free_port(socket.SOCK_STREAM), free_port(), free_port()
    asterisk.write("http.conf", f"[general]\nenabled = yes\nbindaddr = 127.0.0.1\nbindport = {ari_port}\n")
    asterisk.write("ari.conf", shipped("ari.conf", {"password = change-me": f"password = {ari_password}"}))
    asterisk.write("pjsip.conf", lab_pjsip(pbx_port, agent_port, include_trunk=False))
    asterisk.write("extensions.conf", lab_dialplan(tmp_path, with_agent=True))
    shipped_dialplan(asterisk)
    asterisk.start()

    script_log = tmp_path / "ari_external_media.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CALLSCRIBE_URL": bridge.url,
        "CALLSCRIBE_API_TOKEN": api_token,
        "ARI_URL": f"http://127.0.0.1:{ari_port}",
        "ARI_USER": "callscribe",
        "ARI_PASSWORD": ari_password,
    }
    with script_log.open("wb") as out:
        script = subprocess.Popen(  # noqa: ASYNC220 - started once, before the call
            [PYTHON, str(SHIPPED / "ari_external_media.py")], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        await wait_script_ready(script, script_log, "listening for calls")
        hung_up_at, calls = await place_call(asterisk, call_log, "Local/200@callscribe-ari", TWO_PARTY)
        async with httpx.AsyncClient(timeout=5, headers={"Authorization": f"Bearer {api_token}"}) as http:
            left = (await http.get(f"{bridge.url}/v1/legs")).json()
        log_text = script_log.read_text(errors="replace")
    finally:
        script.terminate()
        script.wait(timeout=10)
        print(f"--- ari_external_media.py\n{script_log.read_text(errors='replace')[-3000:]}")

    assert "could not transcribe" not in log_text and "Traceback" not in log_text, log_text
    assert left == [], f"legs still open after the hangup: {left}"
    assert len(calls) == 1, f"one call expected, got {list(calls)}"
    [(_call_id, events)] = calls.items()
    assert {e.leg for e in events if e.type == EventType.LEG_STARTED} == {"caller", "agent"}
    caller_text = heard(events, "caller", CALLER, record_property, "ari_caller")
    agent_text = heard(events, "agent", AGENT, record_property, "ari_agent")
    # Each leg is its own speaker: none of the other side's distinctive words leak in.
    assert not distinctive(AGENT, CALLER) & set(caller_text.split()), caller_text
    assert not distinctive(CALLER, AGENT) & set(agent_text.split()), agent_text
    # ExternalMedia RTP carries no hangup: the script's DELETE /v1/legs at ChannelDestroyed is it.
    ended_promptly(events, hung_up_at, {"released"}, record_property, "ari")


async def start_sip_trunk(asterisk: Asterisk, serve: ServeFactory, tmp_path: Path) -> Callscribe:
    """callscribe's SIP server with digest auth on, Asterisk with the shipped trunk to it."""
    password = secrets.token_urlsafe(16)
    bridge = await serve(
        CALLSCRIBE_SIP_ENABLED="true",
        CALLSCRIBE_SIP_AUTH_USER="asterisk",
        CALLSCRIBE_SIP_AUTH_PASSWORD=password,
        CALLSCRIBE_SIP_ALLOW_NETWORKS='["127.0.0.1/32"]',
    )
    pbx_port, agent_port = free_port(), free_port()
    asterisk.write("pjsip.conf", lab_pjsip(pbx_port, agent_port, include_trunk=True))
    asterisk.write(
        "callscribe/pjsip_callscribe.conf",
        shipped(
            "pjsip_callscribe.conf",
            {"10.0.0.21:5060": f"127.0.0.1:{bridge.sip_port}", "password=change-me": f"password={password}"},
        ),
    )
    asterisk.write("extensions.conf", lab_dialplan(tmp_path, with_agent=True))
    shipped_dialplan(asterisk)
    asterisk.start()
    await asterisk.acli("pjsip set history on")
    return bridge


async def assert_challenged(asterisk: Asterisk, sip_port: int) -> None:
    """callscribe challenged an INVITE (401) and Asterisk sent it again with the shipped
    credentials, which callscribe accepted (200): read from Asterisk's own SIP history."""
    history = await asterisk.acli("pjsip show history")
    to_callscribe = [
        (line.split()[0], line) for line in history.splitlines() if f"127.0.0.1:{sip_port} " in line
    ]
    challenge = next((i for i, (_n, line) in enumerate(to_callscribe) if "401 Unauthorized" in line), None)
    assert challenge is not None, f"callscribe never challenged:\n{history[-3000:]}"
    assert any("200 OK" in line for _n, line in to_callscribe[challenge:]), history[-3000:]
    # The challenged INVITE sent again; with two legs the other leg's first INVITE may come
    # between the 401 and that retry, so look at every INVITE sent after the challenge.
    invites = [n for n, line in to_callscribe[challenge:] if "==>" in line and "INVITE sip:" in line]
    entries = [await asterisk.acli(f"pjsip show history entry {int(n)}") for n in invites]
    assert any(re.search(r'Authorization: Digest .*username="asterisk"', e) for e in entries), entries


async def test_pjsip_trunk_direct_call_with_digest_auth_and_dtmf(
    asterisk: Asterisk, serve: ServeFactory, call_log: CallLog, tmp_path: Path, record_property: Record
) -> None:
    bridge = await start_sip_trunk(asterisk, serve, tmp_path)

    hung_up_at, calls = await place_call(asterisk, call_log, "Local/400@callscribe-direct")
    await assert_challenged(asterisk, bridge.sip_port)

    assert len(calls) == 1, f"one call expected, got {list(calls)}"
    [(call_id, events)] = calls.items()
    assert re.fullmatch(r"\d+\.\d+", call_id), f"call id {call_id!r} is not X-Callscribe-Call-ID (UNIQUEID)"
    assert [e.leg for e in events if e.type == EventType.LEG_STARTED] == ["caller"]
    # dtmf_mode=rfc4733 on the trunk: SendDTMF reaches callscribe as telephone-events.
    assert [e.text for e in events if e.type == EventType.DTMF] == list(DIGITS)
    heard(events, "caller", CALLER, record_property, "sip_direct")
    ended_promptly(events, hung_up_at, {"hangup"}, record_property, "sip_direct")


async def test_pjsip_trunk_two_party_chanspy_fork_with_digest_auth(
    asterisk: Asterisk, serve: ServeFactory, call_log: CallLog, tmp_path: Path, record_property: Record
) -> None:
    bridge = await start_sip_trunk(asterisk, serve, tmp_path)

    inbound = "Local/200@callscribe-example-inbound"
    hung_up_at, calls = await place_call(asterisk, call_log, inbound, TWO_PARTY)
    await assert_challenged(asterisk, bridge.sip_port)

    assert len(calls) == 1, f"the two forks must be one call (X-Callscribe-Call-ID), got {list(calls)}"
    [(call_id, events)] = calls.items()
    assert re.fullmatch(r"\d+\.\d+", call_id), f"call id {call_id!r} is not the inbound channel's UNIQUEID"
    assert {e.leg for e in events if e.type == EventType.LEG_STARTED} == {"caller", "agent"}
    caller_text = heard(events, "caller", CALLER, record_property, "sip_caller")
    agent_text = heard(events, "agent", AGENT, record_property, "sip_agent")
    # ChanSpy's o option: each fork hears only its side (no mix), q: no beep.
    assert not distinctive(AGENT, CALLER) & set(caller_text.split()), caller_text
    assert not distinctive(CALLER, AGENT) & set(agent_text.split()), agent_text
    ended_promptly(events, hung_up_at, {"hangup"}, record_property, "sip")
