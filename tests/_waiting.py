"""Waiting on real servers: poll a condition against a deadline instead of sleeping blind."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import pytest


async def eventually(
    check: Callable[[], Awaitable[bool]],
    what: str,
    *,
    timeout: float = 30,  # noqa: ASYNC109 - a deadline for the whole wait
    interval: float = 0.1,
) -> None:
    """Poll `check` until it is true; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g}s: {what}")
        await anyio.sleep(interval)
