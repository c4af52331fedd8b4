"""Alembic environment of the SQLAlchemy app test (tests/test_apps_sqlalchemy.py).

The usual online-mode env.py: one connection from ``sqlalchemy.url`` (psycopg or
asyncpg), every pending migration run in one transaction (transactional DDL), so a
failing migration leaves the database as it was.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.ext.asyncio import create_async_engine

config = context.config
url = config.get_main_option("sqlalchemy.url")


def run_migrations(connection) -> None:
    context.configure(connection=connection, transactional_ddl=True,
                      transaction_per_migration=False)
    with context.begin_transaction():
        context.run_migrations()


async def run_async() -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


if "+asyncpg" in url:
    asyncio.run(asyncio.wait_for(run_async(), 60))
else:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            run_migrations(connection)
    finally:
        engine.dispose()
