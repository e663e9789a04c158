"""Shared fixtures: one real PostgreSQL per test session, a fresh database per test.

The server is the local one started from its binaries (or the one named by
GRISTMILL_TEST_DATABASE_URL). Each test gets a database cloned from a migrated
template, which takes a few milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from gristmill.dev.postgres import EmbeddedPostgres
from gristmill.store.migrate import migrate_url

TEMPLATE_DB = "gristmill_template"


@pytest.fixture(scope="session")
def postgres_server():
    """URL of a maintenance database on a running server we may create databases on."""
    external = os.environ.get("GRISTMILL_TEST_DATABASE_URL")
    if external:
        yield external
        return
    base = Path(tempfile.mkdtemp(prefix="gristmill-test-pg-", dir="/tmp"))
    server = EmbeddedPostgres(base, durable=False)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _database_url(server_url: str, dbname: str) -> str:
    params = conninfo_to_dict(server_url)
    params["dbname"] = dbname
    return make_conninfo(**params)


@pytest.fixture(scope="session")
def template_database(postgres_server):
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
        conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    asyncio.run(migrate_url(_database_url(postgres_server, TEMPLATE_DB)))
    return TEMPLATE_DB


@contextlib.contextmanager
def _throwaway_database(server_url: str, template: str | None = None):
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    try:
        yield _database_url(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def database_url(postgres_server, template_database):
    """A freshly migrated database of its own for one test."""
    with _throwaway_database(postgres_server, template_database) as url:
        yield url


@pytest.fixture
def empty_database_url(postgres_server):
    """A database with no schema at all, for migration tests."""
    with _throwaway_database(postgres_server) as url:
        yield url


@pytest.fixture
async def private_postgres():
    """(server, url) of a migrated PostgreSQL of this test's own, for tests that restart or
    stop it: the session's server must not go away under the other tests."""
    base = Path(tempfile.mkdtemp(prefix="gristmill-private-pg-", dir="/tmp"))
    server = EmbeddedPostgres(base, durable=False)  # a clean restart loses nothing anyway
    url = await asyncio.to_thread(server.start)
    await migrate_url(url)
    try:
        yield server, url
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def db(database_url):
    """An autocommit async connection to the test's database."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        yield conn
