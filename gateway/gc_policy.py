"""When a process that holds thousands of connections runs CPython's cycle collector.

Used by the gateway workers, and by the firehose's load processes for the same reason.
A worker's heap is mostly sessions, each a handful of containers, and a session
makes no reference cycles: it is freed by reference counting when its client
goes (measured: with automatic collection off, a full collection every 10 s
under 2,000 logins/s found 0 to 19 objects to free, and the heap stayed flat).
CPython's default policy still runs a full collection whenever the survivors
since the last one reach a quarter of the old generation, and under connection
churn every session survives long enough to count: at 20,000 clients that was a
100-250 ms stall of the worker every few seconds, every client's query and login
waiting behind it.

So: the objects made at startup are frozen out of collection (with no collection
first: it would touch, and so copy, every page a worker shares with the supervisor
after fork; 14 MB more across the processes, measured), young-generation
collections run as usual (they are cheap and catch the short-lived cycles an
exception's traceback makes), and full collections, the safety net for a cycle
that does reach the old generation, run when the old generation has doubled
since the last one (checked every few seconds: a leak of cycles can at most
double the heap) and otherwise every few minutes.
"""

from __future__ import annotations

import asyncio
import gc

#: Seconds between full collections when the old generation does not grow.
FULL_COLLECTION_EVERY = 300.0
#: Seconds between looks at the old generation's size.
CHECK_EVERY = 5.0
#: A full collection runs once the old generation has grown by this factor.
GROWTH = 2.0
#: The old-generation size growth is measured against, at least: below it a doubling
#: is a few thousand objects, not worth a full collection.
_MIN_OLD = 10_000
#: CPython's young-generation thresholds are kept; the oldest one is never reached.
_NEVER = 2**31 - 1


class _Collector:
    def __init__(self, loop: asyncio.AbstractEventLoop, every: float, check: float) -> None:
        self.loop = loop
        self.every = every
        self.check = check
        self.since = loop.time()
        self.old_size = len(gc.get_objects(generation=2))
        loop.call_later(check, self.tick)

    def tick(self) -> None:
        size = len(gc.get_objects(generation=2))
        if size > GROWTH * max(self.old_size, _MIN_OLD) or self.loop.time() - self.since >= self.every:
            gc.collect()
            self.since = self.loop.time()
            self.old_size = len(gc.get_objects(generation=2))
        self.loop.call_later(self.check, self.tick)


def apply(loop: asyncio.AbstractEventLoop, every: float = FULL_COLLECTION_EVERY,
          check: float = CHECK_EVERY) -> None:
    """Call once the process is set up, before it serves (or makes) connections."""
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, _NEVER)
    _Collector(loop, every, check)
