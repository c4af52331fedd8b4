"""The shared role-facts epoch and the facts a worker keeps between logins."""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

import pytest

from gateway import role_facts
from gateway.role_facts import RoleFacts
from gateway.worker import PoolerClient
from ipc.codec import IpcError
from ipc.epoch import SharedEpoch
from ipc.shm import create_segment, unlink_segment
from pooler.auth_cache import AuthCache

FACTS = {"op": "auth_info", "req": 7, "password": "SCRAM-SHA-256$x", "can_login": True,
         "expired": False, "db_allow_conn": True, "db_connect": True, "role_exists": True,
         "db_exists": True,
         "role_settings": "", "status": {"server_version": "15"}}


@pytest.fixture
def epoch():
    name = f"/pgfleet-test-epoch-{os.getpid()}-{time.monotonic_ns()}"
    e = SharedEpoch.create(name)
    try:
        yield e
    finally:
        e.close()
        e.unlink()


def test_epoch_bumps_are_seen_by_another_mapping(epoch):
    other = SharedEpoch.attach(epoch.name)
    try:
        assert epoch.value == other.value == 0
        assert epoch.bump() == 1
        assert other.value == 1
        other.bump()
        assert epoch.value == 2
    finally:
        other.close()


def test_the_workers_counter_moves_the_epoch_too(epoch):
    """A worker whose session ran ALTER ROLE bumps its own counter: every worker's
    kept facts go, and the pooler reads the counter alone to drop its cache."""
    facts = RoleFacts(epoch)
    facts.remember("alice", "app", epoch.value, FACTS)
    before = epoch.value
    assert epoch.bump_sessions() == 1
    assert epoch.sessions == 1 and epoch.value != before
    assert facts.get("alice", "app") is None
    epoch.bump()  # the pooler's counter leaves the workers' alone
    assert epoch.sessions == 1


def test_epoch_attach_refuses_a_foreign_segment():
    name = f"/pgfleet-test-epoch-bad-{os.getpid()}"
    m = create_segment(name, 64)
    try:
        m[:8] = b"NOTMINE!"
        with pytest.raises(IpcError):
            SharedEpoch.attach(name)
    finally:
        m.close()
        unlink_segment(name)


def test_facts_kept_until_the_epoch_moves(epoch):
    facts = RoleFacts(epoch)
    asked_at = epoch.value
    facts.remember("alice", "app", asked_at, FACTS)
    kept = facts.get("alice", "app")
    assert kept is not None and kept["password"] == "SCRAM-SHA-256$x"
    assert "status" not in kept and "req" not in kept  # only the role's facts
    assert facts.get("alice", "other") is None
    epoch.bump()
    assert facts.get("alice", "app") is None


def test_answer_that_raced_with_a_bump_is_not_used(epoch):
    facts = RoleFacts(epoch)
    asked_at = epoch.value
    epoch.bump()  # the pooler dropped the role while our question was in flight
    facts.remember("alice", "app", asked_at, FACTS)
    assert facts.get("alice", "app") is None


def test_facts_expire_and_missing_roles_are_not_kept(epoch, monkeypatch):
    facts = RoleFacts(epoch)
    facts.remember("ghost", "app", epoch.value, {**FACTS, "role_exists": False})
    assert facts.get("ghost", "app") is None
    facts.remember("alice", "app", epoch.value, FACTS)
    later = time.monotonic() + role_facts.TTL + 0.01
    monkeypatch.setattr(role_facts.time, "monotonic", lambda: later)
    assert facts.get("alice", "app") is None


def test_forget_drops_every_database_of_the_user(epoch):
    facts = RoleFacts(epoch)
    for db in ("a", "b"):
        facts.remember("alice", db, epoch.value, FACTS)
    facts.remember("bob", "a", epoch.value, FACTS)
    facts.forget("alice")
    assert facts.get("alice", "a") is None and facts.get("alice", "b") is None
    assert facts.get("bob", "a") is not None


def test_logins_waiting_for_the_same_facts_share_one_request() -> None:
    """While the pooler's answer is on its way, more logins for the same role ask
    nothing more: they get the one answer, with the epoch read when it was asked."""
    sent: list[dict] = []
    channel = SimpleNamespace(send=sent.append, on_message=None, on_close=None)

    async def main() -> list:
        epoch = SimpleNamespace(value=7)
        worker = SimpleNamespace(loop=asyncio.get_running_loop(),
                                 role_facts=SimpleNamespace(epoch=epoch), leases=None)
        client = PoolerClient(worker, channel)  # type: ignore[arg-type]
        logins = [asyncio.ensure_future(client.auth("u", "db", "k")) for _ in range(3)]
        await asyncio.sleep(0.01)
        epoch.value = 8  # moved after asking: the answer must keep the older epoch
        late = asyncio.ensure_future(client.auth("u", "db", "k"))
        other = asyncio.ensure_future(client.auth("v", "db", "k"))
        await asyncio.sleep(0.01)
        assert [m["user"] for m in sent] == ["u", "v"]
        for m in sent:
            client.on_message({"op": "auth", "req": m["req"], "user": m["user"]}, [])
        got = await asyncio.gather(*logins, late, other)
        # Asked again once the answer is in: a new request.
        again = asyncio.ensure_future(client.auth("u", "db", "k"))
        await asyncio.sleep(0.01)
        assert len(sent) == 3
        again.cancel()
        return got

    got = asyncio.run(main())
    assert [(epoch, info["user"]) for epoch, info in got] == [(7, "u")] * 4 + [(8, "v")]


def _facts(conf_loaded: bytes = b"t0") -> dict:
    return {"password": None, "can_login": True, "expired": False, "db_allow_conn": True,
            "db_connect": True,
            "role_exists": True, "db_exists": True, "role_settings": "",
            "conf_loaded": conf_loaded, "oids": (b"10", b"5")}


def test_the_pooler_cache_drops_everything_when_a_session_changed_logins():
    """The pooler's side of the workers' counter, without a Postgres: a moved count
    empties the cache (and the status reports, through on_starts_changed), and a
    fetch that a session's change overtook answers its askers but is not kept."""
    async def main() -> None:
        count = [0]
        fetches: list[tuple[str, str]] = []
        starts_changed: list[int] = []
        pool = SimpleNamespace(loop=asyncio.get_running_loop())
        cache = AuthCache(pool, changed_by_sessions=lambda: count[0],
                          on_starts_changed=lambda: starts_changed.append(count[0]))
        overtaken = [False]

        async def fetch(user: str, database: str) -> dict:
            fetches.append((user, database))
            if overtaken[0]:
                count[0] += 1  # ALTER ROLE committed while the catalog query ran
            return _facts()

        cache._fetch = fetch
        first = await cache.lookup("alice", "app")
        assert "conf_loaded" not in first
        await cache.lookup("alice", "app")
        assert len(fetches) == 1  # cached
        count[0] += 1
        await cache.lookup("alice", "app")
        assert len(fetches) == 2 and starts_changed == [1]
        overtaken[0] = True
        cache._entries.clear()
        info = await cache.lookup("alice", "app")
        assert "conf_loaded" not in info and ("alice", "app") not in cache._entries
        overtaken[0] = False
        await cache.lookup("alice", "app")
        assert len(fetches) == 4 and starts_changed == [1, 2]

    asyncio.run(main())


def test_a_configuration_reload_seen_by_the_pooler_makes_status_reports_stale():
    async def main() -> None:
        loaded = [b"t0"]
        starts_changed: list[bytes] = []
        pool = SimpleNamespace(loop=asyncio.get_running_loop())
        cache = AuthCache(pool, ttl=0.0,
                          on_starts_changed=lambda: starts_changed.append(loaded[0]))

        async def fetch(user: str, database: str) -> dict:
            return _facts(loaded[0])

        cache._fetch = fetch
        await cache.lookup("alice", "app", refresh=True)
        await cache.lookup("alice", "app", refresh=True)
        assert starts_changed == []  # the first load time seen is no change
        loaded[0] = b"t1"
        await cache.lookup("alice", "app", refresh=True)
        assert starts_changed == [b"t1"]

    asyncio.run(main())
