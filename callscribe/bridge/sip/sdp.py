"""SDP (RFC 4566) parsing and the answering side of offer/answer (RFC 3264), sans-IO.

callscribe only receives media, so an answer keeps every offered m-line in order, accepts
audio it can decode with the offer's own payload-type numbers, answers `recvonly` (or
`inactive` when the offerer will not send) and rejects the rest with port 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from callscribe.codecs import spec_by_name, spec_for_encoding, spec_for_static_pt
from callscribe.codecs.base import CodecSpec

MAX_SDP_BYTES = 64 * 1024
MAX_MEDIA = 16

TELEPHONE_EVENT = "telephone-event"


def _digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() is true for "²" or "٣", which int() then refuses."""
    return text.isascii() and text.isdigit()


class SdpError(ValueError):
    """An SDP body that cannot be parsed or answered."""


@dataclass(frozen=True)
class RtpMap:
    payload_type: int
    encoding: str
    clock_rate: int
    channels: int = 1

    @property
    def is_dtmf(self) -> bool:
        return self.encoding.lower() == TELEPHONE_EVENT

    @property
    def codec(self) -> str | None:
        """callscribe's codec name, or None when the bridge cannot decode it."""
        spec = spec_for_encoding(self.encoding, self.clock_rate, self.channels)
        return spec.name if spec is not None else None


@dataclass
class MediaDescription:
    media: str
    port: int
    proto: str
    formats: list[str]
    port_count: int = 1
    connection: str | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list)

    def attribute(self, name: str) -> str | None:
        for key, value in self.attributes:
            if key == name:
                return value if value is not None else ""
        return None

    def attribute_values(self, name: str) -> list[str]:
        return [value or "" for key, value in self.attributes if key == name]

    @property
    def label(self) -> str | None:
        return self.attribute("label")

    @property
    def direction(self) -> str | None:
        for key, value in self.attributes:
            if value is None and key in ("sendrecv", "sendonly", "recvonly", "inactive"):
                return key
        return None

    @property
    def rtpmaps(self) -> dict[int, RtpMap]:
        """Payload type → encoding: a=rtpmap lines plus RFC 3551 defaults for static types."""
        maps: dict[int, RtpMap] = {}
        for fmt in self.formats:
            # RFC 3551 static payload types need no a=rtpmap; the codec registry knows them.
            static = spec_for_static_pt(int(fmt)) if _digits(fmt) else None
            if static is not None:
                maps[int(fmt)] = RtpMap(int(fmt), static.encoding, static.clock_rate, static.channels)
        for value in self.attribute_values("rtpmap"):
            pt_text, _, spec = value.partition(" ")
            parts = spec.strip().split("/")
            if not _digits(pt_text) or len(parts) < 2 or not _digits(parts[1]):
                raise SdpError(f"a=rtpmap:{value!r} is not '<pt> <encoding>/<clock>[/<channels>]'")
            channels = int(parts[2]) if len(parts) > 2 and _digits(parts[2]) else 1
            pt = int(pt_text)
            if pt > 127:
                raise SdpError(f"a=rtpmap:{value!r} has payload type {pt}, expected 0-127")
            maps[pt] = RtpMap(pt, parts[0], int(parts[1]), channels)
        return maps

    def fmtp(self, payload_type: int) -> str | None:
        for value in self.attribute_values("fmtp"):
            pt_text, _, params = value.partition(" ")
            if pt_text == str(payload_type):
                return params.strip()
        return None


@dataclass
class SessionDescription:
    origin_user: str = "-"
    session_id: str = "0"
    session_version: int = 0
    origin_address: str = "0.0.0.0"
    session_name: str = "-"
    connection: str | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list)
    media: list[MediaDescription] = field(default_factory=list)

    def connection_for(self, media: MediaDescription) -> str | None:
        return media.connection or self.connection

    def serialize(self) -> bytes:
        lines = [
            "v=0",
            f"o={self.origin_user} {self.session_id} {self.session_version} IN IP4 {self.origin_address}",
            f"s={self.session_name}",
        ]
        if self.connection:
            lines.append(f"c=IN IP4 {self.connection}")
        lines.append("t=0 0")
        lines.extend(_attribute_line(k, v) for k, v in self.attributes)
        for m in self.media:
            lines.append(f"m={m.media} {m.port} {m.proto} {' '.join(m.formats)}")
            if m.connection:
                lines.append(f"c=IN IP4 {m.connection}")
            lines.extend(_attribute_line(k, v) for k, v in m.attributes)
        return ("\r\n".join(lines) + "\r\n").encode()


def _attribute_line(name: str, value: str | None) -> str:
    return f"a={name}" if value is None else f"a={name}:{value}"


def _address(value: str, line: str) -> str:
    parts = value.split()
    if len(parts) < 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise SdpError(f"{line!r} is not 'c=IN IP4 <address>'")
    return parts[2].split("/", 1)[0]


def parse_sdp(body: bytes | str) -> SessionDescription:
    if isinstance(body, bytes):
        if len(body) > MAX_SDP_BYTES:
            raise SdpError(f"SDP of {len(body)} bytes exceeds {MAX_SDP_BYTES}")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SdpError(f"SDP is not UTF-8 at offset {exc.start}") from None
    else:
        text = body
    sdp = SessionDescription()
    seen_version = False
    current: MediaDescription | None = None
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if not line:
            continue
        if len(line) < 2 or line[1] != "=":
            raise SdpError(f"SDP line {line[:80]!r} is not '<type>=<value>'")
        kind, value = line[0], line[2:]
        if kind == "v":
            if value.strip() != "0":
                raise SdpError(f"SDP version {value!r}, expected 0")
            seen_version = True
        elif kind == "o":
            parts = value.split()
            if len(parts) != 6 or not _digits(parts[2]):
                raise SdpError(f"o={value!r} is not '<user> <id> <version> IN IP4 <address>'")
            sdp.origin_user, sdp.session_id = parts[0], parts[1]
            sdp.session_version, sdp.origin_address = int(parts[2]), parts[5]
        elif kind == "s":
            sdp.session_name = value or "-"
        elif kind == "c":
            if current is None:
                sdp.connection = _address(value, line)
            else:
                current.connection = _address(value, line)
        elif kind == "m":
            parts = value.split()
            if len(parts) < 3:
                raise SdpError(f"m={value!r} is not '<media> <port> <proto> <fmt>...'")
            port_text, _, count_text = parts[1].partition("/")
            if not _digits(port_text) or int(port_text) > 65535 or (count_text and not _digits(count_text)):
                raise SdpError(f"m={value!r} has port {parts[1]!r}, expected 0-65535")
            if len(sdp.media) >= MAX_MEDIA:
                raise SdpError(f"more than {MAX_MEDIA} m-lines")
            current = MediaDescription(
                media=parts[0],
                port=int(port_text),
                proto=parts[2],
                formats=parts[3:],
                port_count=int(count_text) if count_text else 1,
            )
            sdp.media.append(current)
        elif kind == "a":
            name, colon, attr_value = value.partition(":")
            attribute = (name.strip(), attr_value.strip() if colon else None)
            (current.attributes if current else sdp.attributes).append(attribute)
    if not seen_version:
        raise SdpError("SDP has no v=0 line")
    return sdp


@dataclass(frozen=True)
class MediaAnswer:
    """What was agreed for one offered m-line (None codec = rejected)."""

    index: int
    codec: str | None
    payload_type: int | None
    payload_types: dict[int, str]
    label: str | None
    receiving: bool
    remote: tuple[str, int] | None


def select_media(offer: SessionDescription) -> list[MediaAnswer]:
    """Per m-line: the first offered codec callscribe decodes (the offerer's preference wins,
    RFC 3264 §6.1), every decodable offered payload type (so a mid-call codec switch within
    the offer needs no new leg) and telephone-event."""
    answers: list[MediaAnswer] = []
    for index, media in enumerate(offer.media):
        rejected = MediaAnswer(index, None, None, {}, media.label, False, None)
        if media.media != "audio" or media.port == 0 or "RTP/AVP" not in media.proto:
            answers.append(rejected)
            continue
        try:
            maps = media.rtpmaps
        except SdpError:
            answers.append(rejected)
            continue
        payload_types: dict[int, str] = {}
        for fmt in media.formats:
            if not _digits(fmt) or int(fmt) not in maps:
                continue
            codec = maps[int(fmt)].codec
            if codec is not None:
                payload_types[int(fmt)] = codec
        audio = [pt for pt in payload_types if not maps[pt].is_dtmf]
        if not audio:
            answers.append(rejected)
            continue
        direction = media.direction or _session_direction(offer) or "sendrecv"
        address = offer.connection_for(media)
        receiving = direction in ("sendrecv", "sendonly") and address not in (None, "0.0.0.0")
        answers.append(
            MediaAnswer(
                index=index,
                codec=payload_types[audio[0]],
                payload_type=audio[0],
                payload_types=payload_types,
                label=media.label,
                receiving=receiving,
                remote=(address, media.port) if address else None,
            )
        )
    return answers


def _session_direction(sdp: SessionDescription) -> str | None:
    for key, value in sdp.attributes:
        if value is None and key in ("sendrecv", "sendonly", "recvonly", "inactive"):
            return key
    return None


def build_answer(
    offer: SessionDescription,
    selected: list[MediaAnswer],
    ports: list[int | None],
    address: str,
    session_id: str,
    session_version: int,
) -> SessionDescription:
    """The SDP answer: same m-lines in the same order (RFC 3264 §6), our port per accepted
    line (None or 0 → rejected), payload types and their rtpmap/fmtp copied from the offer."""
    if len(selected) != len(offer.media) or len(ports) != len(offer.media):
        raise SdpError(f"{len(offer.media)} m-lines offered but {len(selected)}/{len(ports)} answered")
    answer = SessionDescription(
        origin_user="callscribe",
        session_id=session_id,
        session_version=session_version,
        origin_address=address,
        session_name="callscribe",
        connection=address,
    )
    for media, choice, port in zip(offer.media, selected, ports, strict=True):
        if choice.codec is None or not port:
            answer.media.append(MediaDescription(media.media, 0, media.proto, media.formats[:1] or ["0"]))
            continue
        maps = media.rtpmaps
        chosen = [choice.payload_type] + [pt for pt in choice.payload_types if maps[pt].is_dtmf]
        attributes: list[tuple[str, str | None]] = []
        for pt in chosen:
            if pt is None:
                continue
            rtpmap = maps[pt]
            channels = f"/{rtpmap.channels}" if rtpmap.channels != 1 else ""
            attributes.append(("rtpmap", f"{pt} {rtpmap.encoding}/{rtpmap.clock_rate}{channels}"))
            fmtp = media.fmtp(pt)
            if fmtp:
                attributes.append(("fmtp", f"{pt} {fmtp}"))
        if choice.label is not None:
            attributes.append(("label", choice.label))
        attributes.append(("recvonly" if choice.receiving else "inactive", None))
        answer.media.append(
            MediaDescription(
                media.media,
                port,
                media.proto,
                [str(pt) for pt in chosen if pt is not None],
                attributes=attributes,
            )
        )
    return answer


def build_offer(port: int, address: str, session_id: str, dtmf_payload_type: int) -> SessionDescription:
    """Our offer for an INVITE without SDP (RFC 3261 §13.2.1: offer in the 2xx, answer in ACK)."""
    opus_pt = 111 if dtmf_payload_type != 111 else 112
    # In order of preference: wideband first.
    offered: list[tuple[int, CodecSpec]] = [(opus_pt, spec_by_name("opus"))]
    for name in ("g722", "pcmu", "pcma"):
        spec = spec_by_name(name)
        assert spec.static_pt is not None
        offered.append((spec.static_pt, spec))
    attributes: list[tuple[str, str | None]] = [("rtpmap", f"{pt} {_rtpmap(spec)}") for pt, spec in offered]
    attributes += [
        ("rtpmap", f"{dtmf_payload_type} telephone-event/8000"),
        ("fmtp", f"{dtmf_payload_type} 0-16"),
        ("recvonly", None),
    ]
    formats = [str(pt) for pt, _spec in offered] + [str(dtmf_payload_type)]
    return SessionDescription(
        origin_user="callscribe",
        session_id=session_id,
        session_version=1,
        origin_address=address,
        session_name="callscribe",
        connection=address,
        media=[MediaDescription("audio", port, "RTP/AVP", formats, attributes=attributes)],
    )


def _rtpmap(spec: CodecSpec) -> str:
    """'PCMU/8000', 'opus/48000/2' (RFC 7587 §7: opus always names two channels)."""
    channels = 2 if spec.encoding.lower() == "opus" else spec.channels
    return f"{spec.encoding}/{spec.clock_rate}" + (f"/{channels}" if channels > 1 else "")


def offered_payload_types(offer: SessionDescription) -> dict[int, str]:
    """Payload types of our own offer (used when the answer comes back in the ACK)."""
    return {pt: codec for pt, m in offer.media[0].rtpmaps.items() if (codec := m.codec) is not None}
