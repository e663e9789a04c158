"""Shared fixtures: one real PostgreSQL per test session, a fresh database per test.

The server is the local one started from its binaries (or the one named by
GRISTMILL_TEST_DATABASE_URL). Each test gets a database cloned from a migrated
template, which takes a few milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from dataclasses import dataclass

import clusterkit
import k8s_build
import psycopg
import pytest
from k8s_cluster import ControlPlane
from k8s_network import PodNetwork
from k8s_node import NodeThread
from pgkit import embedded_postgres
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
    with embedded_postgres("test-pg") as server:
        yield server.url()


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
    with embedded_postgres("private-pg") as server:
        url = server.url()
        await migrate_url(url)
        yield server, url


@dataclass
class Cluster:
    """The session's real control plane, its node, pod network and a PostgreSQL that pods
    reach at the network's gateway."""

    control_plane: ControlPlane
    node: NodeThread
    network: PodNetwork
    database: EmbeddedPostgres

    def database_url(self, name: str) -> str:
        """A fresh database, by the URL pods use."""
        self.database.create_database(name)
        return self.database.url(name, host=self.network.gateway)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    binaries = k8s_build.cached()
    if binaries is None:
        reason = ("the control plane is not built: run `python3 tests/k8s_build.py` once "
                  "(.ci/run does; 10-20 minutes on 2 cores, cached outside the repo)")
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    network = PodNetwork().create()
    control_plane = node = None
    try:
        control_plane = ControlPlane(binaries, tmp_path_factory.mktemp("control-plane"),
                                     network.gateway).start()
        node = NodeThread(control_plane, network).start()
        with embedded_postgres("cluster-pg", also_listen=network.gateway,
                               also_allow=str(network.subnet)) as database:
            yield Cluster(control_plane, node, network, database)
    finally:
        if node:
            node.stop()
        if control_plane:
            control_plane.stop()
        network.destroy()


@pytest.fixture(scope="session")
def crds(cluster):
    """The cluster with Gristmill's CRDs created and established."""
    clusterkit.kubectl(cluster, "apply", "--server-side", "-f", str(clusterkit.ROOT / "crds"))
    for name in ("scripts", "flows", "workergroups"):
        clusterkit.wait_for(f"CRD {name} established", lambda name=name: clusterkit.condition(
            clusterkit.get(cluster, "crd", f"{name}.gristmill.io"), "Established"
        ).get("status") == "True")
    return cluster


@pytest.fixture
async def db(database_url):
    """An autocommit async connection to the test's database."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        yield conn
