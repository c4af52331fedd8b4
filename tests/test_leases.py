"""The worker's lease cache answering the pooler's reclaims, without sockets: what it
gives back, what it keeps, and what it still owes.

The pooler's side of the same exchange runs against a real pooler in test_pooler.py;
the end-to-end effect (no backend passed back and forth between workers under steady
load) is measured by the firehose in bench/.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from gateway.backend import BackendLink
from gateway.leases import SPARE_AFTER, LeaseManager

KEY = ("postgres", "app")


class Recorder:
    """The pooler channel: keeps what the lease manager sends."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, msg: dict) -> None:
        self.sent.append(msg)

    def released(self) -> list[int]:
        return [m["id"] for m in self.sent if m["op"] == "release"]


class Catalog:
    def load(self, slot: int) -> tuple:
        return ()

    def store(self, slot: int, names) -> None:
        pass


class Transport:
    def close(self) -> None:
        pass


@pytest.fixture
def leases():
    loop = asyncio.new_event_loop()
    worker = SimpleNamespace(
        loop=loop,
        cfg=SimpleNamespace(pool_size=4, query_wait_timeout=0, lease_idle_seconds=60),
        pooler=Recorder(),
        catalog=Catalog(),
    )
    manager = LeaseManager(worker)
    yield manager
    manager.close_all()
    loop.close()


def idle_link(manager: LeaseManager, lease_id: int, idle_for: float = 0.0) -> BackendLink:
    """A leased link back from its session: idle in the cache for ``idle_for`` seconds."""
    link = BackendLink({"id": lease_id, "pid": 1000 + lease_id, "secret": 7}, KEY, manager)
    link.transport = Transport()
    manager.held.add(link)
    manager.put_back(link)
    link.idle_since = time.monotonic() - idle_for
    return link


def test_only_links_idle_for_a_while_are_spare(leases):
    """Asked with nothing owed, a worker gives back links it has not used for a while
    and keeps the one it just used: under load that one is wanted again at once."""
    idle_link(leases, 1, idle_for=10 * SPARE_AFTER)
    idle_link(leases, 2, idle_for=10 * SPARE_AFTER)
    idle_link(leases, 3)
    leases.reclaim({})
    assert leases.worker.pooler.released() == [1, 2]
    assert [lk.id for lk in leases.idle[KEY]] == [3]
    assert leases.debt == {}


def test_a_pool_we_ask_more_of_keeps_its_idle_links(leases):
    idle_link(leases, 1, idle_for=10 * SPARE_AFTER)
    leases.requests_of[KEY] = {41: None}  # a lease request of ours is out
    leases.requests[41] = KEY
    leases.reclaim({})
    assert leases.worker.pooler.released() == []


def test_a_debt_takes_idle_links_first_then_links_coming_free(leases):
    idle_link(leases, 1)  # just used, but owed: given back
    leases.reclaim({KEY: 2})
    assert leases.worker.pooler.released() == [1]
    assert leases.debt == {KEY: 1}
    idle_link(leases, 2)  # a session is done with it: owed, so it goes back
    assert leases.worker.pooler.released() == [1, 2]
    assert leases.debt == {}
    idle_link(leases, 3)  # nothing owed any more: kept for our sessions
    assert leases.worker.pooler.released() == [1, 2]


def test_what_is_owed_is_replaced_not_added_to(leases):
    """Each reclaim says the whole debt as of now: a worker that has already given
    back (or whose shortage elsewhere ended) is not made to give again."""
    leases.reclaim({KEY: 3})
    assert leases.debt == {KEY: 3}
    leases.reclaim({KEY: 1})
    assert leases.debt == {KEY: 1}
    leases.reclaim({}, spare=False)  # nobody waits any more
    assert leases.debt == {}
    idle_link(leases, 1)
    assert leases.worker.pooler.released() == []


def test_told_nobody_waits_a_worker_keeps_its_idle_links(leases):
    idle_link(leases, 1, idle_for=10 * SPARE_AFTER)
    leases.reclaim({}, spare=False)
    assert leases.worker.pooler.released() == []
    assert [lk.id for lk in leases.idle[KEY]] == [1]
