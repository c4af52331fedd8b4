"""The shared statement catalog: same text, same id in every process; bounded sets."""

from __future__ import annotations

import os
import uuid

import multiprocess
import pytest

from ipc.statement_catalog import (
    HASHED_KEY,
    SQL_KEY,
    StatementCatalog,
    backend_name,
    key_of_name,
    sql_key,
)


@pytest.fixture
def catalog():
    c = StatementCatalog.create(f"/pgfleet-test-{uuid.uuid4().hex[:12]}", 64, 4, 8)
    yield c
    c.unlink()
    c.close()


def _bodies(n: int) -> list[bytes]:
    return [b"SELECT %d\x00\x00\x00" % i for i in range(n)]


def _assign(name: str, bodies: list[bytes], out) -> None:
    c = StatementCatalog.attach(name)
    out.put([c.key_for(b) for b in bodies])
    c.close()


def test_same_text_gets_the_same_id_in_every_process(catalog):
    bodies = _bodies(40)
    ctx = multiprocess.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_assign, args=(catalog.name, bodies, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    mine = [catalog.key_for(b) for b in bodies]
    assert all(r == mine for r in results)
    assert len(set(mine)) == 40 and all(0 < k <= 64 for k in mine)
    assert catalog.used == 40


def test_parameter_types_are_part_of_the_fingerprint(catalog):
    text = b"SELECT $1\x00"
    untyped = catalog.key_for(text + b"\x00\x00")
    typed = catalog.key_for(text + b"\x00\x01\x00\x00\x00\x17")  # one int4 parameter
    assert untyped != typed


def test_a_full_catalog_falls_back_to_hash_names(catalog):
    keys = [catalog.key_for(b) for b in _bodies(100)]
    hashed = [k for k in keys if k & HASHED_KEY]
    assert len(keys) - len(hashed) == 64  # every entry used, then hash names
    assert hashed and len(set(hashed)) == len(hashed)
    # Stable: the same text keeps its key.
    assert [catalog.key_for(b) for b in _bodies(100)] == keys


def test_parsed_flag_is_shared(catalog):
    key = catalog.key_for(b"SELECT 1\x00\x00\x00")
    assert not catalog.parsed(key)
    other = StatementCatalog.attach(catalog.name)
    other.mark_parsed(key)
    assert catalog.parsed(key)
    other.close()


def test_sets_round_trip_keep_order_and_bound(catalog):
    keys = [3, 1, sql_key(os.getpid(), 5), 2 | HASHED_KEY]
    catalog.store(2, keys)
    assert catalog.load(2) == keys
    catalog.store(2, list(range(1, 20)))  # more than the 8 a slot holds: the newest stay
    assert catalog.load(2) == list(range(12, 20))
    catalog.clear(2)
    assert catalog.load(2) == []
    with pytest.raises(IndexError):
        catalog.load(4)


def test_names_and_keys_are_inverse():
    for key in (1, 65536, sql_key(4194304, 0xFFFFFFFF), HASHED_KEY | 0x1234ABCD):
        assert key_of_name(backend_name(key)) == key
    assert backend_name(7) == b"pgf_7"
    assert backend_name(sql_key(12, 3)) == b"pgfs_12_3"
    assert sql_key(12, 3) & SQL_KEY
    for junk in (b"stmt1", b"pgf_", b"pgf_x", b"pgfs_1", b"pgf_h"):
        assert key_of_name(junk) is None


def test_a_lock_left_by_a_dead_process_is_taken_over(catalog):
    ctx = multiprocess.get_context("fork")

    def take_and_die(name: str) -> None:
        c = StatementCatalog.attach(name)
        assert c._acquire()
        os._exit(0)  # dies holding the insert lock

    p = ctx.Process(target=take_and_die, args=(catalog.name,))
    p.start()
    p.join(10)
    key = catalog.key_for(b"SELECT 'after'\x00\x00\x00")
    assert 0 < key <= 64  # a real id: the lock was recovered, not bypassed
