"""The asyncio side of every media fork: runs a ForkParser over one websocket connection.

Transport-neutral (the starlette glue in `web/forks.py` adapts its WebSocket to
`ForkConnection`): messages in, parser events out, events applied to legs. Legs open on their
first media or key press, decode with one `callscribe.codecs` decoder each, and all close
(their last finals published) however the socket ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, Protocol

from callscribe.bridge.events import AudioReceived, Dropped, DropReason, DtmfReceived, EndReason
from callscribe.bridge.forks.base import CloseCode, ForkParser
from callscribe.bridge.forks.events import (
    ForkEvent,
    ForkProtocolError,
    RemoteError,
    StreamStarted,
    StreamStopped,
)
from callscribe.bridge.limits import AtCapacity, LegConflict
from callscribe.calls import CallRegistry, Leg
from callscribe.codecs import CodecError, Decoder, decoder_for, spec_by_name
from callscribe.events import EventType, TranscriptEvent
from callscribe.ids import ID_RULE, InvalidId, is_valid_id
from callscribe.metrics import Metrics
from callscribe.security import AccessPolicy

log = logging.getLogger(__name__)

REPLY_DRAIN_SEC = 5.0


class ForkConnection(Protocol):
    async def receive(self) -> str | bytes | None:
        """The next message; None once the peer has gone."""

    @property
    def peer_close_code(self) -> int | None:
        """Once receive() returned None: the code of the peer's close frame; CloseCode.NO_STATUS
        or CloseCode.ABNORMAL when it sent none (or dropped); None when it is unknown."""

    async def send_text(self, text: str) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class StreamEnded(Exception):
    """Ends the receive loop: the close code and reason to send (if the socket is still open)."""

    def __init__(self, code: CloseCode, reason: str, leg_reason: EndReason) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.leg_reason = leg_reason


def transcription_reply(event: TranscriptEvent) -> str:
    """mod_audio_fork's server → FreeSWITCH message; `data` becomes the event body of
    `mod_audio_fork::transcription` (mod_audio_stream: `mod_audio_stream::json`)."""
    data: dict[str, Any] = {
        "call_id": event.call_id,
        "leg": event.leg,
        "seq": event.seq,
        "utt": event.utt,
        "text": event.text,
        "start_ms": event.start_ms,
        "end_ms": event.end_ms,
        "lang": event.lang,
        "is_final": True,
    }
    return json.dumps({"type": "transcription", "data": data}, separators=(",", ":"))


class ForkSession:
    def __init__(
        self,
        parser: ForkParser,
        registry: CallRegistry,
        metrics: Metrics,
        *,
        max_frame_bytes: int,
        peer: str,
        policy: AccessPolicy | None = None,
        start_timeout: float | None = None,
    ) -> None:
        """`policy`: set when the start message must carry the fork token (the sender presented
        none at the HTTP level and its dialect can carry one in-band). `start_timeout`: seconds
        the sender has to send its start message before the socket is closed (None: forever)."""
        self.parser = parser
        self.registry = registry
        self.metrics = metrics
        self.max_frame_bytes = max_frame_bytes
        self.peer = peer
        self.start_policy = policy
        self.start_timeout = start_timeout
        self.transport = parser.transport
        self.started: StreamStarted | None = None
        self.legs: dict[str, Leg] = {}
        self.decoders: dict[str, Decoder] = {}
        self.replies: asyncio.Queue[str] | None = None
        self._start_deadline: float | None = None

    async def run(self, connection: ForkConnection) -> None:
        ended = StreamEnded(CloseCode.NORMAL, "", EndReason.DISCONNECT)
        sender: asyncio.Task[None] | None = None
        try:
            while True:
                message = await self._receive(connection)
                if message is None:
                    code = connection.peer_close_code
                    sent_code = code is not None and code not in (CloseCode.NO_STATUS, CloseCode.ABNORMAL)
                    if self.parser.close_is_hangup and sent_code:
                        ended = StreamEnded(CloseCode.NORMAL, "", EndReason.HANGUP)
                    break
                events = self._parse(message)
                self._apply(events)
                if self.replies is not None and sender is None:
                    sender = asyncio.create_task(self._send_replies(connection))
        except StreamEnded as exc:
            ended = exc
        except ForkProtocolError as exc:
            self.metrics.drop(self.transport, DropReason.PROTOCOL_ERROR)
            log.warning("fork %s from %s: %s", self.parser.dialect, self.peer, exc)
            ended = StreamEnded(CloseCode.UNSUPPORTED, str(exc), EndReason.PROTOCOL_ERROR)
        finally:
            with contextlib.suppress(StreamEnded, ForkProtocolError):
                self._apply(self.parser.finish())
            if self.replies is not None and sender is None:
                sender = asyncio.create_task(self._send_replies(connection))
            await asyncio.gather(*(leg.close(ended.leg_reason) for leg in self.legs.values()))
            if sender is not None:
                # The legs' last finals are queued by now; give them a moment to go out.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drained(), REPLY_DRAIN_SEC)
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
            with contextlib.suppress(Exception):
                await connection.close(ended.code, ended.reason[:120])

    async def _receive(self, connection: ForkConnection) -> str | bytes | None:
        """The next message; until the stream has started, within the start deadline (a socket
        that never says which call it is would otherwise hold one of its source's slots, and
        a sender without a token would be held open waiting for the token in-band)."""
        if self.started is not None or self.start_timeout is None:
            return await connection.receive()
        loop = asyncio.get_running_loop()
        if self._start_deadline is None:
            self._start_deadline = loop.time() + self.start_timeout
        try:
            return await asyncio.wait_for(connection.receive(), max(0.0, self._start_deadline - loop.time()))
        except TimeoutError:
            self.metrics.drop(self.transport, DropReason.START_TIMEOUT)
            log.info(
                "fork %s from %s closed: no start message within %.0f s",
                self.parser.dialect,
                self.peer,
                self.start_timeout,
            )
            raise StreamEnded(
                CloseCode.POLICY, f"no start message within {self.start_timeout:g} s", EndReason.REFUSED
            ) from None

    def _parse(self, message: str | bytes) -> list[ForkEvent]:
        size = len(message)  # characters for text: a lower bound of its bytes, and free
        if size > self.max_frame_bytes:
            return [Dropped(DropReason.OVERSIZED, f"message of {size} bytes, over {self.max_frame_bytes}")]
        self.metrics.packets_received.labels(transport=self.transport).inc()
        if isinstance(message, str):
            return self.parser.receive_text(message)
        return self.parser.receive_bytes(message)

    def _apply(self, events: list[ForkEvent]) -> None:
        for event in events:
            if isinstance(event, AudioReceived):
                self._media(event)
            elif isinstance(event, Dropped):
                self.metrics.drop(self.transport, event.reason)
                log.debug("fork %s from %s dropped a frame: %s", self.parser.dialect, self.peer, event.detail)
            elif isinstance(event, StreamStarted):
                self._start(event)
            elif isinstance(event, DtmfReceived):
                leg = self._leg(event.leg)
                if not leg.closed:
                    leg.dtmf(event.digit, event.duration_ms)
            elif isinstance(event, RemoteError):
                log.warning("fork %s from %s reports: %s", self.parser.dialect, self.peer, event.message)
                for leg in self.legs.values():
                    if not leg.closed:
                        leg.error(event.message, "sender")
            elif isinstance(event, StreamStopped):
                raise StreamEnded(CloseCode.NORMAL, "", EndReason.HANGUP)

    def _start(self, event: StreamStarted) -> None:
        if self.start_policy is not None and not self.start_policy.fork_token_matches(event.token):
            self.metrics.drop(self.transport, DropReason.AUTH)
            why = "missing" if event.token is None else "invalid"
            log.warning(
                "fork %s from %s refused: %s token in the start message", self.parser.dialect, self.peer, why
            )
            raise StreamEnded(CloseCode.POLICY, f"{why} token", EndReason.REFUSED)
        if not event.call_id:
            # e.g. Twilio `"callSid": ""`: there is no call to publish the audio under.
            raise ForkProtocolError("the start message names no call (empty call id)")
        if not is_valid_id(event.call_id):
            self.metrics.drop(self.transport, DropReason.INVALID_ID)
            refusal = InvalidId("call_id", event.call_id)
            log.warning("fork %s from %s refused: %s", self.parser.dialect, self.peer, refusal)
            raise StreamEnded(CloseCode.POLICY, f"call id must be {ID_RULE}"[:120], EndReason.REFUSED)
        self.started = event
        if event.reply_transcripts:
            self.replies = asyncio.Queue()
        if event.meta.get("call_id_generated"):
            log.warning(
                "fork %s from %s names no call; publishing as %s (pass ?call_id= or metadata)",
                self.parser.dialect,
                self.peer,
                event.call_id,
            )

    def _leg(self, name: str) -> Leg:
        leg = self.legs.get(name)
        if leg is not None:
            return leg
        assert self.started is not None, "parsers start the stream before any leg event"
        meta = {**self.started.meta, "peer": self.peer, "transport": self.transport}
        try:
            leg = self.registry.open_leg(self.started.call_id, name, meta, owner=self.peer)
        except LegConflict as exc:
            self.metrics.drop(self.transport, DropReason.LEG_CONFLICT)
            raise StreamEnded(CloseCode.POLICY, str(exc), EndReason.REFUSED) from None
        except InvalidId as exc:
            self.metrics.drop(self.transport, DropReason.INVALID_ID)
            raise StreamEnded(CloseCode.POLICY, str(exc)[:120], EndReason.REFUSED) from None
        except ValueError as exc:  # an id the registry refuses: the sender's data, not our bug
            self.metrics.drop(self.transport, DropReason.REFUSED)
            raise StreamEnded(CloseCode.POLICY, str(exc), EndReason.REFUSED) from None
        except AtCapacity as exc:
            self.metrics.drop(self.transport, DropReason.AT_CAPACITY)
            raise StreamEnded(CloseCode.TRY_LATER, str(exc), EndReason.REFUSED) from None
        if self.replies is not None:
            leg.add_listener(self._reply)
        self.legs[name] = leg
        return leg

    def _media(self, event: AudioReceived) -> None:
        leg = self._leg(event.leg)
        decoder = self.decoders.get(event.leg)
        if decoder is None or decoder.spec.name != event.codec:
            try:
                decoder = decoder_for(spec_by_name(event.codec))
            except CodecError as exc:
                raise ForkProtocolError(f"cannot decode {event.codec}: {exc}") from None
            self.decoders[event.leg] = decoder
        try:
            pcm = decoder.decode(event.payload)
        except CodecError as exc:
            self.metrics.drop(self.transport, DropReason.BAD_PAYLOAD)
            log.debug(
                "fork %s from %s: undecodable %s payload: %s",
                self.parser.dialect,
                self.peer,
                event.codec,
                exc,
            )
            return
        leg.feed(pcm, decoder.spec.sample_rate)

    def _reply(self, event: TranscriptEvent) -> None:
        if event.type == EventType.FINAL and event.text and self.replies is not None:
            self.replies.put_nowait(transcription_reply(event))

    async def _send_replies(self, connection: ForkConnection) -> None:
        assert self.replies is not None
        while True:
            text = await self.replies.get()
            try:
                await connection.send_text(text)
            except Exception:  # the peer went away: nothing more to tell it
                log.debug("fork %s from %s: reply not sent, socket closed", self.parser.dialect, self.peer)
            finally:
                self.replies.task_done()

    async def _drained(self) -> None:
        assert self.replies is not None
        await self.replies.join()
