"""One-line errors for listeners that cannot bind: which listener, which address and port,
and which setting to change — instead of a bare "[Errno 98] Address already in use"."""

from __future__ import annotations

import errno
import socket

from callscribe.settings import Settings


class ListenError(OSError):
    """A listener could not bind; the message names the listener, the address and the setting."""

    def __str__(self) -> str:
        return str(self.strerror)  # without OSError's "[Errno 98]" prefix: the text says it


def _setting(name: str) -> str:
    return f"--{name.replace('_', '-')} or CALLSCRIBE_{name.upper()}"


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "is already in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "is not an address of this host"
    if exc.errno == errno.EACCES:
        return "needs privileges (ports below 1024)"
    return f"cannot be bound ({exc.strerror or exc})"


def listen_error(listener: str, host: str, port: int, port_setting: str, exc: OSError) -> ListenError:
    host_setting = port_setting.removesuffix("_port") + "_host"
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        change = _setting(host_setting)
    else:
        change = _setting(port_setting)
    return ListenError(exc.errno or 0, f"{listener} {host}:{port} {_why(exc)}: choose another with {change}")


# Ingest components by class name (they move between modules; their names stay): what they
# bind and which settings say where.
_COMPONENTS = {
    "RtpIngest": ("RTP auto-leg port (UDP)", "rtp_host", "rtp_port"),
    "SipServer": ("SIP port (UDP and TCP)", "sip_host", "sip_port"),
    "AudioSocketServer": ("AudioSocket port (TCP)", "audiosocket_host", "audiosocket_port"),
}


def component_listen_error(component: object, settings: Settings, exc: OSError) -> OSError:
    """`exc` reworded for the component that raised it; unchanged for other components."""
    known = _COMPONENTS.get(type(component).__name__)
    if known is None or isinstance(exc, ListenError):
        return exc
    listener, host_field, port_field = known
    host, port = getattr(settings, host_field), getattr(settings, port_field)
    return listen_error(listener, host, port, port_field, exc)


def bind_http_socket(settings: Settings) -> socket.socket:
    """The HTTP listening socket, bound here so a taken port is one clear error (uvicorn would
    log its own and exit its task, leaving "Task exception was never retrieved")."""
    host, port = settings.http_host, settings.http_port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise listen_error("HTTP port", host, port, "http_port", exc) from None
    sock.setblocking(False)
    return sock
