"""The workers' garbage-collection policy (gateway.gc_policy), in a fresh interpreter:
applying it changes process-wide collector state that pytest's own process must keep."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT

SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, weakref
    import uvloop
    from gateway import gc_policy

    class Node:
        pass

    async def main():
        loop = asyncio.get_running_loop()
        gc_policy.apply(loop, every=0.05)
        assert gc.get_freeze_count() > 0, "startup objects are frozen out of collection"
        young, middle, oldest = gc.get_threshold()
        assert (young, middle) == (700, 10) and oldest == 2**31 - 1, gc.get_threshold()

        # A cycle that dies young is still freed without anyone calling gc.collect().
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        junk = [[] for _ in range(20000)]  # allocations that trigger young collections
        del junk
        assert gone() is None, "young collections still run"

        # Full collections come from the timer, not from growth of the old generation.
        full_before = gc.get_stats()[2]["collections"]
        await asyncio.sleep(0.3)
        assert gc.get_stats()[2]["collections"] > full_before, "the timer runs full collections"
        print("ok")

    uvloop.run(main())
    """
)


def test_policy_freezes_startup_keeps_young_collections_and_times_full_ones():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
