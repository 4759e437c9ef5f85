"""Alembic migrations build the schema the models describe, on SQLite and on Postgres."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, pool
from sqlmodel import SQLModel

import core.store.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from core.store.migrate import alembic_config, upgrade

TABLES = {"jobs", "job_metrics", "workers", "api_keys", "idempotency_keys", "files"}


def head_revision(url: str) -> str:
    heads = ScriptDirectory.from_config(alembic_config(url)).get_heads()
    assert len(heads) == 1, f"migrations have several heads: {heads}"
    return heads[0]


def current_revision(url: str) -> str | None:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def schema_diff(url: str) -> list[object]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            return list(compare_metadata(context, SQLModel.metadata))
    finally:
        engine.dispose()


def user_tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


@pytest.fixture
def fresh_sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fresh.db'}"


@pytest.fixture
def private_pg(pg_url: str) -> Iterator[str]:
    """A database of our own on the test server, for a destructive downgrade."""
    import psycopg

    from tests.conftest import PG_ADMIN

    name = f"medtune_mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_models_metadata_has_the_job_tables() -> None:
    # Guards the diff tests below against comparing an empty metadata with an empty database.
    assert set(SQLModel.metadata.tables) >= TABLES


def test_upgrade_head_on_fresh_sqlite(fresh_sqlite: str) -> None:
    assert user_tables(fresh_sqlite) == set()
    upgrade(fresh_sqlite)
    assert user_tables(fresh_sqlite) == TABLES
    assert current_revision(fresh_sqlite) == head_revision(fresh_sqlite)


def test_sqlite_schema_matches_models(fresh_sqlite: str) -> None:
    upgrade(fresh_sqlite)
    assert schema_diff(fresh_sqlite) == []


def test_upgrade_twice_is_a_no_op(fresh_sqlite: str) -> None:
    upgrade(fresh_sqlite)
    upgrade(fresh_sqlite)
    assert current_revision(fresh_sqlite) == head_revision(fresh_sqlite)
    assert schema_diff(fresh_sqlite) == []


def test_downgrade_base_then_upgrade_head_on_sqlite(fresh_sqlite: str) -> None:
    upgrade(fresh_sqlite)
    command.downgrade(alembic_config(fresh_sqlite), "base")
    assert user_tables(fresh_sqlite) == set()
    assert current_revision(fresh_sqlite) is None
    upgrade(fresh_sqlite)
    assert user_tables(fresh_sqlite) == TABLES
    assert schema_diff(fresh_sqlite) == []


def test_upgrade_head_on_postgres(migrated_pg: str) -> None:
    assert current_revision(migrated_pg) == head_revision(migrated_pg)
    assert user_tables(migrated_pg) == TABLES
    upgrade(migrated_pg)  # already at head: nothing to do, nothing breaks
    assert current_revision(migrated_pg) == head_revision(migrated_pg)


def test_postgres_schema_matches_models(migrated_pg: str) -> None:
    assert schema_diff(migrated_pg) == []


def test_downgrade_base_then_upgrade_head_on_postgres(private_pg: str) -> None:
    upgrade(private_pg)
    assert user_tables(private_pg) == TABLES
    command.downgrade(alembic_config(private_pg), "base")
    assert user_tables(private_pg) == set()
    upgrade(private_pg)
    assert schema_diff(private_pg) == []


def test_diff_detects_a_schema_that_does_not_match(fresh_sqlite: str) -> None:
    """The comparison is not vacuous: a missing column shows up."""
    upgrade(fresh_sqlite)
    engine = create_engine(fresh_sqlite, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE jobs DROP COLUMN worker")
    finally:
        engine.dispose()
    diff = schema_diff(fresh_sqlite)
    assert any(d[0] == "add_column" and d[3].name == "worker" for d in diff), diff  # type: ignore[index]
