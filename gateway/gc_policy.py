"""When a process that holds thousands of connections runs CPython's cycle collector.

Used by the gateway workers, and by the firehose's load processes for the same reason.

A worker's heap is mostly sessions, each a handful of containers, and a session
makes no reference cycles: it is freed by reference counting when its client
goes (measured: with automatic collection off, a full collection every 10 s
under 2,000 logins/s found 0 to 19 objects to free, and the heap stayed flat). CPython's default policy still runs a full
collection whenever the survivors since the last one reach a quarter of the old
generation, and under connection churn every session survives long enough to
count: at 20,000 clients that was a 100-250 ms stall of the worker every few
seconds, every client's query and login waiting behind it.

So: the objects made at startup are frozen out of collection, young-generation
collections run as usual (they are cheap and catch the short-lived cycles an
exception's traceback makes), and the full collection, a safety net against a
cycle that does reach the old generation, runs on a timer instead of on every
quarter of growth.
"""

from __future__ import annotations

import asyncio
import gc

#: Seconds between full collections.
FULL_COLLECTION_EVERY = 300.0
#: CPython's young-generation thresholds, kept; the oldest one is never reached.
_NEVER = 2**31 - 1


def apply(loop: asyncio.AbstractEventLoop, every: float = FULL_COLLECTION_EVERY) -> None:
    """Call once the worker is set up, before it serves clients."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, _NEVER)

    def full() -> None:
        gc.collect()
        loop.call_later(every, full)

    loop.call_later(every, full)
