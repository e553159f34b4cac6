"""First contact, as a user meets it: every mistake of items 3-6 of issue 13 is one line on
stderr naming what to change, a non-zero exit, and no traceback (that needs --debug)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import free_port

CLI = [sys.executable, "-m", "callscribe"]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CALLSCRIBE_")}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env={**clean, **(env or {})}
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Task exception" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("callscribe: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def serve_args(*extra: str) -> list[str]:
    return [
        "serve",
        "--http-port",
        str(free_port(socket.SOCK_STREAM)),
        "--rtp-port",
        str(free_port()),
        "--audiosocket-port",
        "0",
        *extra,
    ]


# -- item 3: tracebacks instead of one line ------------------------------------------------


def test_bad_redis_url() -> None:
    one_line_error(run(*serve_args("--redis-url", "redis//127.0.0.1:6379")), 2, "--redis-url", "redis://")


def test_tail_with_redis_down() -> None:
    port = free_port(socket.SOCK_STREAM)
    one_line_error(
        run("tail", "--redis-url", f"redis://127.0.0.1:{port}/0"),
        1,
        "not reachable",
        f":{port}",
        "--redis-url",
    )


def test_unknown_log_level() -> None:
    one_line_error(run(*serve_args("--log-level", "verbose")), 2, "--log-level", "'verbose'", "debug, info")


def test_http_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            "serve", "--http-port", str(port), "--rtp-port", str(free_port()), "--audiosocket-port", "0"
        )
    one_line_error(result, 1, f"HTTP port 127.0.0.1:{port}", "in use", "--http-port")


def test_rtp_port_in_use() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = run(*serve_args()[:3], "--rtp-port", str(port), "--audiosocket-port", "0")
    one_line_error(result, 1, f"RTP auto-leg port (UDP) 127.0.0.1:{port}", "in use", "--rtp-port")


def test_audiosocket_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(*serve_args()[:5], "--audiosocket-port", str(port))
    one_line_error(result, 1, f"AudioSocket port (TCP) 127.0.0.1:{port}", "--audiosocket-port")


def test_debug_shows_the_traceback() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("--debug", "serve", "--http-port", str(port), "--rtp-port", str(free_port()))
    assert result.returncode != 0 and "Traceback" in result.stderr


# -- item 4: "ready" only when ready --------------------------------------------------------


def test_ready_is_not_logged_while_redis_is_down() -> None:
    dead = free_port(socket.SOCK_STREAM)
    args = serve_args("--redis-url", f"redis://127.0.0.1:{dead}/0")
    proc = subprocess.Popen(
        [*CLI, *args],
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("CALLSCRIBE_")},
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "waiting for Redis" in line or "ready" in line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "waiting for Redis" in lines[-1] and f":{dead}" in lines[-1], lines
    assert not any("callscribe ready" in line for line in lines)


# -- item 5: configuration ------------------------------------------------------------------


def test_comma_list_in_env_is_accepted_and_a_bad_entry_named() -> None:
    result = run(*serve_args(), env={"CALLSCRIBE_ALLOW_NETWORKS": "10.0.0.0/8,10.0.0.0/33"})
    one_line_error(result, 2, "CALLSCRIBE_ALLOW_NETWORKS", "'10.0.0.0/33'")


def test_env_typo_is_warned_with_the_closest_name() -> None:
    # A bad log level stops the start right after the warning pass would have run: the typo
    # warning must come before any slow start, so check it with a start that fails fast.
    dead = free_port(socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [*CLI, *serve_args("--redis-url", f"redis://127.0.0.1:{dead}/0")],
        stderr=subprocess.PIPE,
        text=True,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("CALLSCRIBE_")},
            "CALLSCRIBE_HTTP_PROT": "1",
        },
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "CALLSCRIBE_HTTP_PROT" in first and "did you mean CALLSCRIBE_HTTP_PORT?" in first


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text("http_port = \n")
    one_line_error(run("serve", "--config", str(config)), 2, str(config), "TOML syntax error", "line 1")


def test_toml_typo_names_key_file_and_closest(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text("http_prot = 8081\n")
    one_line_error(run("serve", "--config", str(config)), 2, "'http_prot'", str(config), "http_port")


def test_bad_env_value_names_the_variable() -> None:
    one_line_error(run("serve", env={"CALLSCRIBE_HTTP_PORT": "eighty"}), 2, "CALLSCRIBE_HTTP_PORT")


def test_missing_config_file() -> None:
    one_line_error(run("serve", "--config", "/nonexistent/x.toml"), 2, "/nonexistent/x.toml", "--config")


def test_wildcard_bind_without_public_host_is_refused() -> None:
    one_line_error(run(*serve_args("--rtp-host", "0.0.0.0")), 2, "CALLSCRIBE_RTP_PUBLIC_HOST")


# -- item 6: the command line -----------------------------------------------------------------


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("callscribe 0.")


def test_serve_help_shows_defaults_and_every_ingest() -> None:
    result = run("serve", "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0
    for needle in (
        "--audiosocket-port",
        "--sip",
        "--sip-port",
        "--cors-origin",
        "--rtp-public-host",
        "9092",
        "8080",
        "40002-40999",
        "redis://127.0.0.1:6379/0",
    ):
        assert needle in result.stdout, needle


@pytest.mark.parametrize("codec", ["telephone-event", "s16le-192k"])
def test_send_refuses_internal_codecs_at_once(codec: str, tmp_path: Path) -> None:
    from callscribe.demo import default_clip

    clip = default_clip()
    assert clip is not None
    result = run("send", str(clip), "--to", "127.0.0.1:9", "--codec", codec, timeout=30)
    one_line_error(result, 2, f"'{codec}'", "choose one of pcmu")


def test_send_without_terminal_shows_no_progress_and_says_bye() -> None:
    from callscribe.demo import default_clip

    clip = default_clip()
    assert clip is not None
    result = run("send", str(clip), "--to", "127.0.0.1:9", "--speed", "50", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "RTCP BYE" in result.stderr
