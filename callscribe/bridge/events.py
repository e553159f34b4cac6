"""The ingests' shared vocabulary: what a protocol core reports, and why legs end or data drops.

Every sans-IO core (RTP receiver, AudioSocket parser, fork parsers, SIP UAS) reports audio,
key presses and counted drops with these three events, so each I/O shell applies them the
same way. `EndReason` and `DropReason` values are public: `EndReason` is the `reason` of
`leg.ended` events on the Redis stream, `DropReason` the `reason` label of
`callscribe_packets_dropped_total`. One spelling (snake_case), one value per cause.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# The leg name when the sender names none (one-sided RTP, AudioSocket, a plain SIP call).
CALLER = "caller"


class EndReason(StrEnum):
    """Why a leg ended (`leg.ended` meta.reason)."""

    HANGUP = "hangup"  # the sender ended it: hangup frame, fork stop, WHIP DELETE, RTCP BYE
    DISCONNECT = "disconnect"  # the connection closed without a hangup
    IDLE_TIMEOUT = "idle_timeout"  # no media for leg_idle_timeout_sec
    RELEASED = "released"  # DELETE /v1/legs/{id}, or the SIP session that reserved it ended
    SHUTDOWN = "shutdown"  # the service is stopping
    REFUSED = "refused"  # opened, then refused (leg conflict, capacity, auth in the start message)
    PROTOCOL_ERROR = "protocol_error"  # the sender broke its protocol; the connection was closed
    TRACK_ENDED = "track_ended"  # WebRTC: the sender stopped the audio track
    CONNECTION_FAILED = "connection_failed"  # WebRTC: ICE/DTLS connection failed
    CONNECTION_CLOSED = "connection_closed"  # WebRTC: the peer connection closed
    BRIDGE_LOST = "bridge_lost"  # the instance serving it died; another (or its restart) ended it


class DropReason(StrEnum):
    """Why a packet, frame or message was counted and dropped (`callscribe_packets_dropped_total`)."""

    # admission (every ingest)
    NOT_ALLOWED = "not_allowed"  # source outside allow_networks / sip_allow_networks
    AUTH = "auth"  # missing or wrong token / signature
    CONNECTION_LIMIT = "connection_limit"  # too many connections from one source
    RATE_LIMITED = "rate_limited"  # over max_packets_per_sec_per_source
    OVERSIZED = "oversized"  # datagram, frame or message over its size limit
    AT_CAPACITY = "at_capacity"  # the bridge holds max legs
    LEG_CONFLICT = "leg_conflict"  # a leg of that name is already open in the call
    REFUSED = "refused"  # a connection refused before its leg opened (AudioSocket)
    INVALID_ID = "invalid_id"  # a call id or leg name outside the id rule (callscribe.ids)
    PROTOCOL_ERROR = "protocol_error"  # a stream closed for breaking its protocol
    START_TIMEOUT = "start_timeout"  # a fork websocket sent no start message within its deadline
    # RTP
    TRUNCATED = "truncated"  # shorter than its header (or, SIP, its Content-Length)
    BAD_VERSION = "bad_version"
    BAD_CSRC = "bad_csrc"
    BAD_EXTENSION = "bad_extension"
    BAD_PADDING = "bad_padding"
    RTCP = "rtcp"  # RTCP other than BYE: callscribe does not use reports
    DUPLICATE = "duplicate"  # a sequence number already received
    LATE = "late"  # arrived after its gap was given up
    SSRC_CONFLICT = "ssrc_conflict"  # a second SSRC while the first still talks
    FOREIGN_SOURCE = "foreign_source"  # not the address a reserved leg latched
    UNKNOWN_PAYLOAD_TYPE = "unknown_payload_type"
    UNSUPPORTED_CODEC = "unsupported_codec"
    COMFORT_NOISE = "comfort_noise"  # RFC 3389 CN: the gap is concealed anyway
    EMPTY_PAYLOAD = "empty_payload"
    UNDECODABLE = "undecodable"  # the codec rejected the payload
    TIMESTAMP_JUMP = "timestamp_jump"  # a timestamp gap over max_gap_ms (concealed up to it)
    BAD_DTMF = "bad_dtmf"  # an RFC 4733 event or DTMF frame that is not a digit
    UNCONFIRMED_SOURCE = "unconfirmed_source"  # a new auto-leg source failed RFC 3550 probation
    AUTO_LEG_LIMIT = "auto_leg_limit"  # the per-host auto-leg cap
    LEG_CLOSING = "leg_closing"  # the source's previous leg is still flushing
    LOST = "lost"  # WebRTC frames missing from the timeline
    NOT_AUDIO = "not_audio"  # WebRTC: a non-audio frame on an audio track
    BAD_FRAME = "bad_frame"  # WebRTC: an audio frame of an unusable layout
    # AudioSocket and forks
    EMPTY = "empty"  # a frame or message with no content
    ODD_LENGTH = "odd_length"  # 16-bit audio of an odd byte count
    DUPLICATE_UUID = "duplicate_uuid"
    UNKNOWN_KIND = "unknown_kind"  # an AudioSocket frame kind callscribe does not know
    BAD_JSON = "bad_json"
    BAD_SHAPE = "bad_shape"  # JSON that is not the dialect's message shape
    BAD_BASE64 = "bad_base64"
    BAD_CONTROL = "bad_control"  # an Asterisk chan_websocket control message that does not parse
    BAD_PAYLOAD = "bad_payload"  # fork media the codec cannot decode
    UNKNOWN_EVENT = "unknown_event"
    UNEXPECTED_BINARY = "unexpected_binary"
    BEFORE_START = "before_start"  # media before the start message
    AFTER_STOP = "after_stop"
    DUPLICATE_START = "duplicate_start"
    # SIP
    MALFORMED = "malformed"
    NOT_UTF8 = "not_utf8"
    TOO_MANY_HEADERS = "too_many_headers"
    BAD_HEADER = "bad_header"
    BAD_CONTENT_LENGTH = "bad_content_length"
    BAD_START_LINE = "bad_start_line"
    BAD_VIA = "bad_via"
    BAD_CSEQ = "bad_cseq"
    NO_VIA = "no_via"
    MISSING_HEADER = "missing_header"
    UNEXPECTED_RESPONSE = "unexpected_response"  # the UAS sends no requests that await answers
    OVERLOAD = "overload"  # MAX_TRANSACTIONS open
    ACK_WITHOUT_DIALOG = "ack_without_dialog"
    TCP_PEER_GONE = "tcp_peer_gone"  # a response for a TCP connection that closed
    BAD_BODY = "bad_body"  # an INVITE whose SDP or SIPREC body does not parse
    BAD_ACK_SDP = "bad_ack_sdp"  # the answer in an ACK does not parse


@dataclass(frozen=True, slots=True)
class AudioReceived:
    """Audio for a leg, as encoded as `codec` says (a callscribe.codecs name: pcmu, l16-16k,
    s16le-8k...). The RTP receiver decodes itself (to conceal losses in the codec's own way)
    and reports native int16 PCM as s16le-<rate>."""

    leg: str
    payload: bytes
    codec: str


@dataclass(frozen=True, slots=True)
class DtmfReceived:
    leg: str
    digit: str
    duration_ms: int = 0


@dataclass(frozen=True, slots=True)
class Dropped:
    """Something read past and counted; `detail` is for the debug log only."""

    reason: DropReason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SenderEnded:
    """The sender ended its stream on purpose (RTP: an RTCP BYE of the latched source)."""

    reason: EndReason = EndReason.HANGUP


MediaEvent = AudioReceived | DtmfReceived | Dropped | SenderEnded
