"""RTP packets (RFC 3550 §5.1), sans-IO: `RtpPacket.parse()` / `serialize()`, and the
RTCP tests a receiver needs (rtcp-mux detection, RFC 5761 §4; BYE, RFC 3550 §6.6)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from callscribe.bridge.events import DropReason

RTP_VERSION = 2
HEADER = struct.Struct("!BBHII")
_EXTENSION = struct.Struct("!HH")
SEQ_MOD = 1 << 16
TS_MOD = 1 << 32
RTCP_BYE = 203


class RtpError(ValueError):
    """A datagram that is not a valid RTP packet. `reason` is a short metric label."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(slots=True)
class RtpPacket:
    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrc: tuple[int, ...] = ()
    extension_profile: int | None = None
    extension: bytes = b""
    padding: int = 0

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        size = len(data)
        if size < 12:
            raise RtpError(DropReason.TRUNCATED, f"{size} bytes, an RTP header needs 12")
        first, second, seq, timestamp, ssrc = HEADER.unpack_from(data)
        if first >> 6 != RTP_VERSION:
            raise RtpError(DropReason.BAD_VERSION, f"RTP version {first >> 6}, expected 2")
        offset = 12
        csrc: tuple[int, ...] = ()
        count = first & 0x0F
        if count:
            offset += 4 * count
            if offset > size:
                raise RtpError(DropReason.BAD_CSRC, f"{count} CSRCs need {offset} bytes, packet has {size}")
            csrc = struct.unpack_from(f"!{count}I", data, 12)
        profile: int | None = None
        extension = b""
        if first & 0x10:
            if offset + 4 > size:
                raise RtpError(DropReason.BAD_EXTENSION, f"extension header at {offset} beyond {size} bytes")
            profile, words = _EXTENSION.unpack_from(data, offset)
            end = offset + 4 + 4 * words
            if end > size:
                raise RtpError(
                    DropReason.BAD_EXTENSION, f"extension of {words} words ends at {end}, packet has {size}"
                )
            extension = data[offset + 4 : end]
            offset = end
        padding = 0
        if first & 0x20:
            padding = data[-1]
            if padding == 0 or offset + padding > size:
                raise RtpError(
                    DropReason.BAD_PADDING, f"padding count {padding} with {size - offset} bytes after header"
                )
            size -= padding
        return cls(
            second & 0x7F,
            seq,
            timestamp,
            ssrc,
            data[offset:size],
            bool(second & 0x80),
            csrc,
            profile,
            extension,
            padding,
        )

    def serialize(self) -> bytes:
        if len(self.csrc) > 15:
            raise RtpError(DropReason.BAD_CSRC, f"{len(self.csrc)} CSRCs, at most 15 fit")
        if len(self.extension) % 4:
            raise RtpError(
                DropReason.BAD_EXTENSION, f"extension of {len(self.extension)} bytes is not 32-bit words"
            )
        has_extension = self.extension_profile is not None
        first = (
            RTP_VERSION << 6 | (0x20 if self.padding else 0) | (0x10 if has_extension else 0) | len(self.csrc)
        )
        parts = [
            HEADER.pack(
                first,
                (0x80 if self.marker else 0) | self.payload_type,
                self.sequence_number,
                self.timestamp,
                self.ssrc,
            )
        ]
        if self.csrc:
            parts.append(struct.pack(f"!{len(self.csrc)}I", *self.csrc))
        if has_extension:
            parts.append(_EXTENSION.pack(self.extension_profile or 0, len(self.extension) // 4))
            parts.append(self.extension)
        parts.append(self.payload)
        if self.padding:
            parts.append(bytes(self.padding - 1) + bytes([self.padding]))
        return b"".join(parts)


def is_rtcp(data: bytes) -> bool:
    """With rtcp-mux (RFC 5761 §4) RTCP shares the port; its packet types 192-223 sit where
    RTP has marker + payload type, and no RTP payload type uses those values."""
    return len(data) >= 2 and 192 <= data[1] <= 223


def seq_delta(seq: int, reference: int) -> int:
    """Signed distance from `reference` to `seq` on the 16-bit sequence circle."""
    return (seq - reference + 0x8000) % SEQ_MOD - 0x8000


def rtcp_bye_ssrcs(data: bytes) -> list[int] | None:
    """The SSRCs a (compound) RTCP packet says goodbye for (RFC 3550 §6.6), None when it has
    no BYE. Walks the compound packet by each header's length; a malformed one ends the walk."""
    offset = 0
    size = len(data)
    while offset + 4 <= size:
        first, packet_type, words = (
            data[offset],
            data[offset + 1],
            int.from_bytes(data[offset + 2 : offset + 4]),
        )
        end = offset + 4 * (words + 1)
        if first >> 6 != RTP_VERSION or end > size:
            return None
        if packet_type == RTCP_BYE:
            count = first & 0x1F
            if offset + 4 + 4 * count > end:
                return None
            return [int.from_bytes(data[i : i + 4]) for i in range(offset + 4, offset + 4 + 4 * count, 4)]
        offset = end
    return None
