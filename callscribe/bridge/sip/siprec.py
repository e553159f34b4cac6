"""SIPREC (RFC 7865/7866) for a recording server, sans-IO: multipart bodies and rs-metadata.

An SRC (SBC, PBX, Kamailio/OpenSIPS) sends an INVITE whose multipart/mixed body holds the
SDP (one m-line per recorded stream, `a=label`) and the recording metadata XML. Each m-line
maps label → stream_id → the participant whose `send` lists that stream; the leg is named
after that participant. Tolerated: namespaces with and without the ':1' suffix (AudioCodes,
Sonus), `application/rs-metadata` without '+xml', and no metadata at all (Cisco), where the
first m-line is the caller and the second the callee.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as safe_xml
from defusedxml import DefusedXmlException

from callscribe.bridge.sip.sdp import SessionDescription
from callscribe.ids import derive_id

MAX_PARTS = 8
MAX_METADATA_BYTES = 128 * 1024
METADATA_TYPES = ("application/rs-metadata+xml", "application/rs-metadata")
RECORDING_NAMESPACES = ("urn:ietf:params:xml:ns:recording:1", "urn:ietf:params:xml:ns:recording")
UNLABELLED_LEGS = ("caller", "callee")


class SiprecError(ValueError):
    """A SIPREC body or metadata document that cannot be used."""


@dataclass(frozen=True)
class BodyPart:
    content_type: str
    disposition: str
    content: bytes


def _header_param(value: str, name: str) -> str | None:
    match = re.search(rf';\s*{name}\s*=\s*("([^"]*)"|[^;\s]+)', value, re.IGNORECASE)
    if match is None:
        return None
    return match.group(2) if match.group(2) is not None else match.group(1)


def split_multipart(content_type: str, body: bytes) -> list[BodyPart]:
    """The parts of a multipart/mixed body (RFC 2046 §5.1), headers lower-cased."""
    boundary = _header_param(content_type, "boundary")
    if not boundary or len(boundary) > 70:
        raise SiprecError(f"Content-Type {content_type!r} has no usable boundary parameter")
    delimiter = b"--" + boundary.encode("utf-8", "replace")
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise SiprecError(f"multipart body has no parts delimited by {delimiter.decode(errors='replace')!r}")
    parts: list[BodyPart] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # close delimiter
        if len(parts) >= MAX_PARTS:
            raise SiprecError(f"multipart body has more than {MAX_PARTS} parts")
        # The CRLF before a delimiter belongs to the delimiter (RFC 2046 §5.1.1).
        chunk = chunk.removeprefix(b"\r\n").removeprefix(b"\n")
        chunk = chunk.removesuffix(b"\r\n").removesuffix(b"\n")
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = chunk.partition(b"\n\n")
        if not sep:
            head, content = chunk, b""
        ctype, disposition = "text/plain", ""
        for line in head.decode("utf-8", "replace").replace("\r\n", "\n").split("\n"):
            name, _, value = line.partition(":")
            key = name.strip().lower()
            if key in ("content-type", "c"):
                ctype = value.strip()
            elif key == "content-disposition":
                disposition = value.strip()
        parts.append(BodyPart(ctype, disposition, content))
    return parts


@dataclass(frozen=True)
class Participant:
    participant_id: str
    aor: str
    name: str

    def as_meta(self) -> dict[str, str]:
        return {"id": self.participant_id, "aor": self.aor, "name": self.name}


@dataclass
class RecordingMetadata:
    """What rs-metadata says about the recorded call."""

    sip_session_ids: list[str] = field(default_factory=list)
    participants: dict[str, Participant] = field(default_factory=dict)
    stream_labels: dict[str, str] = field(default_factory=dict)  # label → stream_id
    senders: dict[str, str] = field(default_factory=dict)  # stream_id → participant_id
    call_data: dict[str, str] = field(default_factory=dict)

    def participant_for_label(self, label: str | None) -> Participant | None:
        if label is None:
            return None
        stream_id = self.stream_labels.get(label)
        participant_id = self.senders.get(stream_id or "")
        return self.participants.get(participant_id or "")

    def as_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"participants": [p.as_meta() for p in self.participants.values()]}
        if self.sip_session_ids:
            # The recorded call's own Call-ID (a Cisco value carries ';remote=...').
            meta["original_call_id"] = self.sip_session_ids[0].split(";", 1)[0]
        if self.call_data:
            meta["call_data"] = dict(self.call_data)
        return meta


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _namespace(tag: str) -> str:
    return tag[1:].split("}", 1)[0] if tag.startswith("{") else ""


def _text(element: Element | None) -> str:
    return (element.text or "").strip() if element is not None else ""


def _child(element: Element, name: str) -> Element | None:
    for child in element:
        if _local(child.tag) == name:
            return child
    return None


def parse_rs_metadata(document: bytes) -> RecordingMetadata:
    """Parse recording metadata (RFC 7865 §6); entity declarations are refused."""
    if len(document) > MAX_METADATA_BYTES:
        raise SiprecError(f"metadata of {len(document)} bytes exceeds {MAX_METADATA_BYTES}")
    try:
        root = safe_xml.fromstring(document, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise SiprecError(f"metadata refused: {type(exc).__name__}") from None
    except Exception as exc:  # ElementTree.ParseError and expat errors on arbitrary bytes
        raise SiprecError(f"metadata is not XML: {exc}") from None
    if _local(root.tag) != "recording" or _namespace(root.tag) not in (*RECORDING_NAMESPACES, ""):
        raise SiprecError(f"metadata root is {root.tag!r}, expected recording in {RECORDING_NAMESPACES[0]}")
    metadata = RecordingMetadata()
    for element in root.iter():
        name = _local(element.tag)
        if name == "sipSessionID" and _text(element):
            metadata.sip_session_ids.append(_text(element))
        elif name == "participant":
            participant_id = element.get("participant_id") or element.get("id") or ""
            name_id = _child(element, "nameID")
            aor = (name_id.get("aor") or "") if name_id is not None else ""
            display = _text(_child(name_id, "name")) if name_id is not None else ""
            if participant_id:
                metadata.participants[participant_id] = Participant(participant_id, aor, display)
        elif name == "stream":
            stream_id = element.get("stream_id") or ""
            label = _text(_child(element, "label"))
            if stream_id and label:
                metadata.stream_labels[label] = stream_id
        elif name == "participantstreamassoc":
            participant_id = element.get("participant_id") or ""
            for child in element:
                if _local(child.tag) == "send" and _text(child):
                    metadata.senders[_text(child)] = participant_id
        elif name == "callData":
            for child in element:
                if _text(child):
                    metadata.call_data[_local(child.tag)] = _text(child)
    return metadata


@dataclass(frozen=True)
class SiprecOffer:
    sdp: bytes
    metadata: RecordingMetadata | None


def is_siprec(content_type: str, require: list[str]) -> bool:
    return content_type.lower().startswith("multipart/") or "siprec" in (r.lower() for r in require)


def parse_siprec_body(content_type: str, body: bytes) -> SiprecOffer:
    """The SDP and metadata of a SIPREC INVITE or re-INVITE body."""
    if not content_type.lower().startswith("multipart/mixed"):
        if content_type.split(";", 1)[0].strip().lower() == "application/sdp":
            return SiprecOffer(body, None)
        raise SiprecError(f"SIPREC body of type {content_type!r}, expected multipart/mixed")
    sdp: bytes | None = None
    metadata: RecordingMetadata | None = None
    for part in split_multipart(content_type, body):
        kind = part.content_type.split(";", 1)[0].strip().lower()
        if kind == "application/sdp" and sdp is None:
            sdp = part.content
        elif kind in METADATA_TYPES and metadata is None:
            metadata = parse_rs_metadata(part.content)
    if sdp is None:
        raise SiprecError("multipart body has no application/sdp part")
    return SiprecOffer(sdp, metadata)


@dataclass(frozen=True)
class RecordedStream:
    """One offered m-line of a recording session: the leg it feeds and who speaks on it."""

    index: int
    leg: str
    label: str | None
    participant: Participant | None


def leg_name(participant: Participant) -> str:
    """A leg name from a participant: the AOR without its scheme, else the display name, else
    the participant id; "" when all are blank (the caller then names the leg by position)."""
    aor = participant.aor.strip()
    for scheme in ("sips:", "sip:", "tel:"):
        if aor.lower().startswith(scheme):
            aor = aor[len(scheme) :]
            break
    # Metadata text, not a chosen id: made to follow the id rule rather than refused. Each
    # candidate is stripped before it is chosen (an AOR of "sip: " or "   " is blank); all blank
    # gives "" and the stream is named by its position.
    for candidate in (aor, participant.name, participant.participant_id):
        if candidate.strip():
            return derive_id(candidate.strip(), "participant")
    return ""


def recorded_streams(sdp: SessionDescription, metadata: RecordingMetadata | None) -> list[RecordedStream]:
    """Name a leg for each m-line; names are unique within the recording session."""
    streams: list[RecordedStream] = []
    used: set[str] = set()
    for index, media in enumerate(sdp.media):
        participant = metadata.participant_for_label(media.label) if metadata else None
        name = leg_name(participant) if participant is not None else ""
        if not name:  # no participant, or one whose AOR, name and id are all blank
            name = (
                UNLABELLED_LEGS[index]
                if index < len(UNLABELLED_LEGS)
                else derive_id(f"stream-{media.label or index + 1}", f"stream-{index + 1}")
            )
        unique, n = name, 2
        while unique in used:
            unique, n = f"{name}-{n}", n + 1
        used.add(unique)
        streams.append(RecordedStream(index, unique, media.label, participant))
    return streams
