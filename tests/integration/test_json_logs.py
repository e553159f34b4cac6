"""JSON logs of a real `callscribe serve`: ISO-8601 times with milliseconds and offset, and
every line about a call carries `call_id` and `leg` as fields (not only inside the text)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

import httpx

from callscribe.logs import JsonFormatter, TextFormatter, call_context
from tests.support import free_port, free_port_range

ISO_MS_OFFSET = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")


def test_serve_json_lines_carry_time_and_call_fields() -> None:
    http_port = free_port(socket.SOCK_STREAM)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSCRIBE_")}
    env |= {"CALLSCRIBE_KEY_PREFIX": f"cstest-logs-{os.getpid()}", "CALLSCRIBE_LOG_JSON": "true"}
    args = [
        "serve",
        "--http-port",
        str(http_port),
        "--rtp-port",
        str(free_port()),
        "--rtp-port-range",
        free_port_range(),
        "--audiosocket-port",
        "0",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "callscribe", *args], stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as http:
            while True:
                assert time.monotonic() < deadline, "serve not ready"
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
            created = http.post("/v1/legs", json={"call_id": "log-call-1", "leg": "agent"})
            assert created.status_code == 201, created.text
            assert http.delete(f"/v1/legs/{created.json()['leg_id']}").status_code == 204
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=60)
    entries = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert entries and len(entries) == len(stderr.splitlines()), "every line is one JSON object"
    for entry in entries:
        assert ISO_MS_OFFSET.match(entry["ts"]), entry["ts"]
    about_call = [e for e in entries if "log-call-1" in e["msg"]]
    assert len(about_call) >= 2, entries  # the leg opened, reserved and ended
    for entry in about_call:
        assert entry["call_id"] == "log-call-1", entry
        assert entry["leg"] == "agent", entry
    # Lines about no call carry no call fields.
    assert all("call_id" not in e for e in entries if "ready" in e["msg"])


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("callscribe.test", logging.INFO, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_fields_from_extra_and_context() -> None:
    formatter = JsonFormatter()
    entry = json.loads(formatter.format(record("decoding", call_id="c-1", leg="caller")))
    assert (entry["call_id"], entry["leg"]) == ("c-1", "caller")
    with call_context("c-2", "agent"):
        entry = json.loads(formatter.format(record("something about the leg")))
    assert (entry["call_id"], entry["leg"]) == ("c-2", "agent")
    entry = json.loads(formatter.format(record("nothing about a call")))
    assert "call_id" not in entry and "leg" not in entry
    parsed = datetime.datetime.fromisoformat(entry["ts"])
    assert parsed.utcoffset() is not None


def test_text_lines_cannot_be_forged() -> None:
    line = TextFormatter().format(record("refused %s", "x\n2026-01-01 ERROR callscribe.security: FORGED"))
    assert "\n" not in line and "\\n2026" in line
