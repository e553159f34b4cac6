"""The pure parts of WHIP ingest: frames to mono PCM, RTP-timestamp gaps, leg naming, request parameters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.requests import Request

from callscribe.bridge.webrtc import FrameTimeline, leg_names, mono_pcm
from callscribe.web.whip import session_params


def request(query: str = "", headers: dict[str, str] | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request(
        {"type": "http", "method": "POST", "path": "/whip", "query_string": query.encode(), "headers": raw}
    )


def test_stereo_frames_are_averaged_to_mono() -> None:
    packed = np.array([[100, 300, -32768, -32768, 5, -5]], dtype=np.int16)
    assert mono_pcm(packed, 2).tolist() == [200, -32768, 0]
    assert mono_pcm(packed, 1).tolist() == packed[0].tolist()


def test_frames_that_do_not_fit_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="int16"):
        mono_pcm(np.zeros((1, 4), np.float32), 1)
    with pytest.raises(ValueError, match="5 samples do not split into 2 channels"):
        mono_pcm(np.zeros((1, 5), np.int16), 2)


def test_timeline_reports_missing_audio_and_ignores_reorder_and_restarts() -> None:
    timeline = FrameTimeline(48000)
    assert timeline.gap(1000, 960) == 0
    assert timeline.gap(1960, 960) == 0  # contiguous
    assert timeline.gap(1960 + 960 + 1920, 960) == 1920  # two 20 ms frames lost
    assert timeline.gap(100, 960) == 0  # went backwards: reorder or a new sender, not a gap
    assert timeline.gap(100 + 960 + 48000 * 5, 960) == 0  # 5 s: a muted sender, not lost packets
    assert timeline.gap(None, 960) == 0


@given(start=st.integers(0, 2**32 - 1), lost_frames=st.integers(0, 50))
def test_timeline_gaps_survive_the_rtp_timestamp_wrap(start: int, lost_frames: int) -> None:
    timeline = FrameTimeline(48000)
    timeline.gap(start, 960)
    after = (start + 960 * (1 + lost_frames)) % 2**32
    assert timeline.gap(after, 960) == 960 * lost_frames


def test_tracks_beyond_the_named_legs_get_numbered_names() -> None:
    assert leg_names(["caller"], 1) == ["caller"]
    assert leg_names(["caller", "agent"], 1) == ["caller"]
    assert leg_names(["caller", "agent"], 3) == ["caller", "agent", "caller-3"]
    assert leg_names([], 2) == ["caller", "caller-2"]


def test_session_parameters_come_from_the_query_or_headers() -> None:
    call_id, legs, meta = session_params(request("call_id=c-1&leg=caller,agent&meta.queue=billing"))
    assert (call_id, legs, meta) == ("c-1", ["caller", "agent"], {"queue": "billing"})
    call_id, legs, _ = session_params(
        request(headers={"X-Callscribe-Call-Id": "c-2", "X-Callscribe-Leg": "agent"})
    )
    assert (call_id, legs) == ("c-2", ["agent"])
    call_id, legs, _ = session_params(request())
    assert len(call_id) == 32 and legs == ["caller"]


@pytest.mark.parametrize(
    "query",
    ["call_id=has%20space", "call_id=" + "x" * 129, "leg=a,a", "leg=%7Bbrace%7D", "call_id=%0A"],
)
def test_bad_names_are_refused(query: str) -> None:
    with pytest.raises(ValueError, match=r"call_id|leg"):
        session_params(request(query))
