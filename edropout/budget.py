"""A time and memory budget for one step of Python code (torch-pruning's channel grouping), so that a blow-up fails
fast with a clear error instead of exhausting the machine.

Torch-Pruning's grouping can grow without bound on some graphs: on torchvision's swin_t its index mappings through
the window reshapes expand every channel index into millions of Python objects (24 GB before the kernel's OOM
killer). A watchdog thread polls the process's resident memory and the elapsed time, and when either exceeds the
budget it raises ``BudgetExceeded`` in the guarded thread (delivered at the next Python bytecode, which is where
such a blow-up spends its time). Resident memory is read from /proc (Linux); elsewhere only time is watched.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time


class BudgetExceeded(Exception):
    """The guarded step ran past its time or memory budget (the guard's ``reason`` says which)."""


_POLL_SECONDS = 0.05


def resident_bytes() -> int:
    """Resident memory of this process in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Guard:
    """What the watchdog saw: ``reason`` is None, or why it stopped the step."""

    def __init__(self):
        self.reason = None


def _raise_in(thread_id: int, exc_type) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exc_type)


@contextlib.contextmanager
def budget(seconds: float, extra_bytes: int):
    """Within the block, ``BudgetExceeded`` is raised in this thread once the block has run ``seconds`` or the
    process holds ``extra_bytes`` more resident memory than at entry. Yields a ``Guard`` naming the reason."""
    guard, stop = Guard(), threading.Event()
    target = threading.get_ident()
    start, base = time.monotonic(), resident_bytes()

    def watch():
        while not stop.wait(_POLL_SECONDS):
            grown = resident_bytes() - base if base else 0
            if grown > extra_bytes:
                guard.reason = f"it needed more than {extra_bytes / 2 ** 30:.1f} GiB of extra memory"
            elif time.monotonic() - start > seconds:
                guard.reason = f"it ran longer than {seconds:g} s"
            if guard.reason is not None:
                _raise_in(target, ctypes.py_object(BudgetExceeded))
                return

    watcher = threading.Thread(target=watch, name="edropout-budget", daemon=True)
    watcher.start()
    try:
        yield guard
    finally:
        stop.set()
        watcher.join()
        if guard.reason is not None:
            _raise_in(target, None)  # not yet delivered: never let it land after the block
