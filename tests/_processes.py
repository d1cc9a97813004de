"""Child processes in tests: Python one-liners, and finding them again from the host.

A sandboxed calculation's pids belong to its own PID namespace, so tests mark the processes they
start with a unique argument and look for it in `/proc/*/cmdline`, which sees every namespace.
"""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import anyio


def python(code: str, *args: str) -> list[str]:
    """argv running `code` (dedented) with `args` as sys.argv[1:]."""
    return [sys.executable, "-c", textwrap.dedent(code), *args]


def new_marker() -> str:
    return f"parjobs-test-{uuid.uuid4().hex}"


def marked_pids(marker: str) -> list[int]:
    """Host pids of the running processes with `marker` in their command line (a zombie has
    none), whichever PID namespace they are in."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # ended meanwhile
            continue
    return pids


def running(marker: str) -> bool:
    return bool(marked_pids(marker))


async def gone(marker: str, within_s: float = 2.0) -> bool:
    """Whether every process marked `marker` ends within `within_s` (killing takes a moment)."""
    with anyio.move_on_after(within_s):
        while running(marker):
            await anyio.sleep(0.02)
        return True
    return False
