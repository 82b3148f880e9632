"""Workers sleep until woken (new work committed) or until their poll comes round."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_until_set(event: asyncio.Event, timeout_s: float) -> None:
    """Wait until `event` is set or `timeout_s` passes, whichever is first.

    Not `asyncio.wait_for(event.wait(), ...)`: on Python 3.11 that swallows a
    cancellation arriving just as the event is set (it returns the result instead), and
    a worker loop built on it then never stops. `asyncio.timeout` counts cancellations.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
