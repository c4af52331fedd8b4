"""SQLAlchemy 2 (with psycopg 3 and with asyncpg) and Alembic run unchanged through pgfleet.

- ORM CRUD: related models with JSONB and ARRAY columns, server defaults, a failed
  flush rolled back and the session used again; the same unit of work on both drivers.
- Alembic: migrations run through ``alembic.command`` with the usual env.py
  (``tests/apps/alembic_migrations``), transactional DDL: a migration failing half-way
  leaves neither its table nor its column behind, and the version stays put; plus
  ``MigrationContext``/``Operations`` used by hand, with a rolled-back DDL transaction.
- Server-side cursors: 10,000 rows streamed with ``stream_results``/``yield_per``
  (psycopg's named cursor: DECLARE/FETCH; asyncpg's portal fetches), with other
  statements interleaved in the same transaction.

Every test checks its results straight on Postgres too. The module has its own pgfleet
(and so its own Postgres), which lets the migrations use fixed table names.
"""

from __future__ import annotations

import asyncio
import datetime
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy import exc, func, insert, select, update
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
)

from .conftest import PASSWORD

MIGRATIONS = Path(__file__).resolve().parent / "apps" / "alembic_migrations"
DRIVERS = ["psycopg", "asyncpg"]
STREAM_ROWS = 10_000


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "sa_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.Text, unique=True)
    profile: Mapped[dict] = mapped_column(JSONB, default=dict)
    created: Mapped[datetime.datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=func.now())
    books: Mapped[list[Book]] = relationship(back_populates="author", cascade="all, delete-orphan",
                                             order_by="Book.id")


class Book(Base):
    __tablename__ = "sa_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("sa_authors.id"))
    title: Mapped[str] = mapped_column(sa.Text)
    price: Mapped[Decimal] = mapped_column(sa.Numeric(10, 2))
    tags: Mapped[list[str]] = mapped_column(ARRAY(sa.Text), default=list)
    author: Mapped[Author] = relationship(back_populates="books")


class Item(Base):
    __tablename__ = "sa_items"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    payload: Mapped[str] = mapped_column(sa.Text)
    weight: Mapped[int] = mapped_column()


class Tick(Base):
    __tablename__ = "sa_ticks"
    id: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int] = mapped_column(default=0)


@pytest.fixture(scope="module")
def fleet(make_module_server):
    server = make_module_server("--workers", "2", "--pool-size", "5")
    with psycopg.connect(server.direct_dsn(), autocommit=True) as conn:
        conn.execute("create database sa_app")
    return server


def url(server, driver: str, dbname: str = "sa_app") -> str:
    # No TLS: psycopg's default sslmode=prefer and asyncpg's ssl would try it first.
    ssl = "sslmode=disable" if driver == "psycopg" else "ssl=disable"
    return (f"postgresql+{driver}://postgres:{PASSWORD}@127.0.0.1:{server.port}/{dbname}"
            f"?{ssl}")


def direct(server):
    return psycopg.connect(server.direct_dsn("sa_app"), autocommit=True)


def run(coro, timeout: float = 120.0):
    """Run ``coro`` to completion, failing (never hanging) after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def schema(fleet):
    engine = sa.create_engine(url(fleet, "psycopg"))
    Base.metadata.create_all(engine)
    engine.dispose()
    return fleet


# ---------------------------------------------------------------------------- ORM CRUD

def crud(session: Session, tag: str) -> dict:
    """One app's unit of work, written once and run on both drivers."""
    a = Author(name=f"ursula-{tag}", profile={"born": 1929, "genres": ["sf", "fantasy"]},
               books=[Book(title="The Dispossessed", price=Decimal("9.99"), tags=["sf", "anarchy"]),
                      Book(title="A Wizard of Earthsea", price=Decimal("7.50"), tags=["fantasy"])])
    b = Author(name=f"iain-{tag}", profile={"born": 1954, "genres": ["sf"]},
               books=[Book(title="Excession", price=Decimal("11.00"), tags=["sf", "culture"])])
    session.add_all([a, b])
    session.commit()
    assert a.id is not None and a.created is not None

    # Read: JSONB and ARRAY operators, a join, eager loading.
    sf = session.scalars(select(Author).where(Author.profile["genres"].contains(["sf"]))
                         .where(Author.name.like(f"%-{tag}")).order_by(Author.id)
                         .options(selectinload(Author.books))).all()
    assert [x.name for x in sf] == [f"ursula-{tag}", f"iain-{tag}"]
    assert [bk.title for bk in sf[0].books] == ["The Dispossessed", "A Wizard of Earthsea"]
    total = session.scalar(select(func.sum(Book.price)).join(Author)
                           .where(Book.tags.contains(["sf"])).where(Author.name.like(f"%-{tag}")))
    assert total == Decimal("20.99")

    # Update: attribute change, JSONB replacement, a bulk UPDATE.
    a.profile = {**a.profile, "awards": 8}
    a.books[1].price = Decimal("8.25")
    session.execute(update(Book).where(Book.author_id == b.id).values(price=Book.price * 2))
    session.commit()

    # A failing flush (duplicate name) rolls back; the session goes on.
    session.add(Author(name=f"iain-{tag}", profile={}))
    with pytest.raises(exc.IntegrityError) as info:
        session.commit()
    assert info.value.orig.sqlstate == "23505"
    session.rollback()

    # Delete with cascade.
    session.delete(b)
    session.commit()
    session.expire_all()
    left = session.scalars(select(Author).where(Author.name.like(f"%-{tag}"))).all()
    assert [x.name for x in left] == [f"ursula-{tag}"]
    assert left[0].profile == {"born": 1929, "genres": ["sf", "fantasy"], "awards": 8}
    return {"author_id": a.id, "book_prices": [bk.price for bk in left[0].books]}


def check_crud_directly(server, tag: str) -> None:
    with direct(server) as conn:
        rows = conn.execute(
            "select a.name, a.profile->>'awards', b.title, b.price, b.tags from sa_authors a"
            " join sa_books b on b.author_id = a.id where a.name like %s order by b.id",
            (f"%-{tag}",)).fetchall()
    assert rows == [(f"ursula-{tag}", "8", "The Dispossessed", Decimal("9.99"), ["sf", "anarchy"]),
                    (f"ursula-{tag}", "8", "A Wizard of Earthsea", Decimal("8.25"), ["fantasy"])]


def test_orm_crud_psycopg(schema):
    tag = uuid.uuid4().hex[:8]
    engine = sa.create_engine(url(schema, "psycopg"), pool_size=3)
    try:
        with Session(engine) as session:
            result = crud(session, tag)
    finally:
        engine.dispose()
    assert result["book_prices"] == [Decimal("9.99"), Decimal("8.25")]
    check_crud_directly(schema, tag)


def test_orm_crud_asyncpg(schema):
    tag = uuid.uuid4().hex[:8]

    async def main():
        engine = create_async_engine(url(schema, "asyncpg"), pool_size=3)
        try:
            maker = async_sessionmaker(engine, expire_on_commit=False)
            async with maker() as session:
                result = await session.run_sync(crud, tag)
            # And natively async: awaitable queries, a transaction, an update.
            async with maker() as session, session.begin():
                author = await session.scalar(
                    select(Author).where(Author.name == f"ursula-{tag}")
                    .options(selectinload(Author.books)))
                assert [b.title for b in author.books] == ["The Dispossessed",
                                                           "A Wizard of Earthsea"]
                n = await session.scalar(select(func.count()).select_from(Book)
                                         .where(Book.author_id == author.id))
                assert n == 2
            return result
        finally:
            await engine.dispose()

    result = run(main())
    assert result["book_prices"] == [Decimal("9.99"), Decimal("8.25")]
    check_crud_directly(schema, tag)


# ---------------------------------------------------------------------------- Alembic

def table_exists(server, name: str) -> bool:
    with direct(server) as conn:
        return conn.execute("select to_regclass(%s) is not null", (name,)).fetchone()[0]


def columns(server, table: str) -> list[str]:
    with direct(server) as conn:
        return [r[0] for r in conn.execute(
            "select column_name from information_schema.columns where table_name = %s"
            " order by ordinal_position", (table,))]


@pytest.mark.parametrize("driver", DRIVERS)
def test_alembic_upgrade_failed_migration_downgrade(fleet, driver):
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url(fleet, driver).replace("%", "%%"))

    command.upgrade(cfg, "0001")
    assert columns(fleet, "accounts") == ["id", "name", "balance"]
    with direct(fleet) as conn:
        assert conn.execute("select version_num from alembic_version").fetchall() == [("0001",)]
        assert conn.execute("select id, name, balance from accounts order by id").fetchall() == [
            (1, "alice", Decimal("0.00")), (2, "bob", Decimal("0.00"))]
        assert conn.execute(
            "select indexdef from pg_indexes where indexname = 'accounts_name_idx'"
        ).fetchone()[0].startswith("CREATE UNIQUE INDEX")

    # 0002 creates a table and a column, then fails: the whole transaction goes.
    with pytest.raises(exc.DBAPIError) as info:
        command.upgrade(cfg, "head")
    assert "division by zero" in str(info.value)
    assert not table_exists(fleet, "audit_log")
    assert columns(fleet, "accounts") == ["id", "name", "balance"]
    with direct(fleet) as conn:
        assert conn.execute("select version_num from alembic_version").fetchall() == [("0001",)]

    command.downgrade(cfg, "base")
    assert not table_exists(fleet, "accounts")
    with direct(fleet) as conn:
        assert conn.execute("select count(*) from alembic_version").fetchone() == (0,)
        conn.execute("drop table alembic_version")


def test_migration_context_operations(fleet):
    """Alembic's Operations by hand: DDL committed, then DDL rolled back."""
    name = f"ops_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(url(fleet, "psycopg"))
    try:
        with engine.begin() as conn:
            op = Operations(MigrationContext.configure(conn))
            op.create_table(name, sa.Column("id", sa.Integer, primary_key=True),
                            sa.Column("v", sa.String(10)))
            op.alter_column(name, "v", type_=sa.Text, new_column_name="value")
            op.add_column(name, sa.Column("flag", sa.Boolean, server_default=sa.false()))
            op.create_check_constraint(f"{name}_value_ck", name, "length(value) < 100")
        assert columns(fleet, name) == ["id", "value", "flag"]

        with engine.connect() as conn:
            trans = conn.begin()
            op = Operations(MigrationContext.configure(conn))
            op.create_table(f"{name}_more", sa.Column("id", sa.Integer, primary_key=True))
            op.drop_column(name, "flag")
            op.rename_table(name, f"{name}_renamed")
            # Inside the transaction the DDL is visible...
            assert conn.scalar(sa.text("select to_regclass(:n) is not null"),
                               {"n": f"{name}_more"})
            trans.rollback()
        # ...and after the rollback none of it is.
        assert not table_exists(fleet, f"{name}_more")
        assert not table_exists(fleet, f"{name}_renamed")
        assert columns(fleet, name) == ["id", "value", "flag"]
    finally:
        engine.dispose()
        with direct(fleet) as conn:
            conn.execute(f"drop table if exists {name}, {name}_more, {name}_renamed")


# ---------------------------------------------------------------------------- streaming

@pytest.fixture(scope="module")
def items(schema):
    """10,000 rows inserted through the ORM (insertmanyvalues batches)."""
    engine = sa.create_engine(url(schema, "psycopg"))
    try:
        with Session(engine) as session:
            session.execute(insert(Item), [{"id": i, "payload": f"item {i:05d} " + "x" * 40,
                                            "weight": i % 97} for i in range(1, STREAM_ROWS + 1)])
            session.add(Tick(id=1, n=0))
            session.commit()
    finally:
        engine.dispose()
    with direct(schema) as conn:
        assert conn.execute("select count(*) from sa_items").fetchone() == (STREAM_ROWS,)
    return schema


EXPECTED_WEIGHT = sum(i % 97 for i in range(1, STREAM_ROWS + 1))


def test_stream_results_psycopg(items):
    engine = sa.create_engine(url(items, "psycopg"))
    try:
        # Core: a named server-side cursor, fetched 1,000 rows at a time.
        with engine.connect() as conn:
            result = conn.execute(select(Item.id, Item.weight).order_by(Item.id),
                                  execution_options={"stream_results": True,
                                                     "max_row_buffer": 1000})
            seen = total = 0
            for chunk in result.partitions(1000):
                seen += len(chunk)
                total += sum(w for _, w in chunk)
                # Another statement in the same transaction between two FETCHes.
                conn.execute(update(Tick).where(Tick.id == 1).values(n=Tick.n + 1))
            conn.commit()
        assert (seen, total) == (STREAM_ROWS, EXPECTED_WEIGHT)

        # ORM: yield_per.
        with Session(engine) as session:
            ids = []
            for item in session.scalars(select(Item).order_by(Item.id)
                                        .execution_options(yield_per=500)):
                ids.append(item.id)
                assert item.payload.startswith(f"item {item.id:05d}")
            assert ids == list(range(1, STREAM_ROWS + 1))
    finally:
        engine.dispose()
    with direct(items) as conn:
        n = conn.execute("select n from sa_ticks where id = 1").fetchone()[0]
        assert n >= 10


def test_stream_results_asyncpg(items):
    async def main():
        engine = create_async_engine(url(items, "asyncpg"))
        try:
            async with engine.connect() as conn:
                result = await conn.stream(select(Item.id, Item.weight).order_by(Item.id)
                                           .execution_options(yield_per=1000))
                seen = total = 0
                async for chunk in result.partitions():
                    seen += len(chunk)
                    total += sum(w for _, w in chunk)
                    await conn.execute(update(Tick).where(Tick.id == 1).values(n=Tick.n + 1))
                await conn.commit()
            async with AsyncSession(engine) as session:
                ids = [item.id async for item in await session.stream_scalars(
                    select(Item).order_by(Item.id).execution_options(yield_per=500))]
            return seen, total, ids
        finally:
            await engine.dispose()

    seen, total, ids = run(main())
    assert (seen, total) == (STREAM_ROWS, EXPECTED_WEIGHT)
    assert ids == list(range(1, STREAM_ROWS + 1))
