"""Worker-process hygiene shared by engines that run decoders in child processes.

Two concerns, both about memory and processes outliving their purpose:

- Returning freed memory. A pocketsphinx Decoder is ~56 MB of small C allocations (the
  acoustic model is loaded per Decoder). Freeing one returns it to glibc's heap, not to the
  system: measured, 20 Decoders took a worker from 231 to 1356 MB, freeing them left 1300 MB,
  and `malloc_trim(0)` brought it to 190 MB. So a worker trims after it frees decoders.
- Dying with the parent. A SIGKILLed `callscribe serve` runs no cleanup, so each worker asks
  the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG), and, since that signal is
  tied to the parent *thread* that forked it and is Linux-only, also watches its parent pid
  from a daemon thread (re-parenting changes `getppid()`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def trim_heap() -> bool:
    """Give free heap pages back to the system (glibc only); True if anything was released."""
    if _LIBC is None or not hasattr(_LIBC, "malloc_trim"):
        return False
    return bool(_LIBC.malloc_trim(0))


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process from /proc (0.0 when it is gone or not on Linux)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def die_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Exit this process as soon as `parent_pid` is no longer its parent."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the prctl above
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
