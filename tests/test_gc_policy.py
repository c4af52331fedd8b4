"""The garbage-collection policy of workers and firehose processes (gateway.gc_policy),
in a fresh interpreter: applying it changes process-wide collector state that pytest's
own process must keep."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT

PRELUDE = textwrap.dedent(
    """
    import asyncio, gc, weakref
    import uvloop
    from gateway import gc_policy

    class Node:
        pass

    def cycles(n):
        "n pairs of objects that refer to each other, promoted to the old generation"
        keep = []
        for _ in range(n):
            a, b = Node(), Node()
            a.other, b.other = b, a
            keep.append(a)
        gc.collect(1)  # survivors of a middle collection move to the oldest one
        return keep, weakref.ref(keep[0])

    async def freed(ref):
        "whether the object is freed within 5 s, with the event loop running meanwhile"
        for _ in range(100):
            await asyncio.sleep(0.05)
            if ref() is None:
                return True
        return False
    """
)


def run(body: str) -> None:
    script = PRELUDE + "\nasync def main():\n" + textwrap.indent(textwrap.dedent(body), "    ")
    script += "\n    print('ok')\n\nuvloop.run(main())\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_startup_frozen_young_collections_kept_no_automatic_full_ones():
    run(
        """
        gc_policy.apply(asyncio.get_running_loop(), every=1000, check=1000)
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

        # A cycle that reached the old generation waits for a full collection.
        keep, old = cycles(100)
        del keep
        junk = [[] for _ in range(200000)]
        del junk
        assert old() is not None, "no automatic full collection"
        """
    )


def test_a_doubled_old_generation_is_collected_soon():
    run(
        """
        gc_policy.apply(asyncio.get_running_loop(), every=1000, check=0.05)
        keep, old = cycles(20000)  # 80,000 objects: well past double the old generation
        del keep
        assert await freed(old), "a full collection ran once the old generation doubled"
        """
    )


def test_full_collections_also_come_from_the_timer():
    run(
        """
        gc_policy.apply(asyncio.get_running_loop(), every=0.1, check=0.05)
        keep, old = cycles(100)  # far too few to double anything
        del keep
        assert await freed(old), "the timer ran a full collection"
        """
    )
