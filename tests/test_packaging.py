"""The package as worker_image/Dockerfile installs it (from a wheel, not editable) has what
workers and job pods need, and a job pod's command runs from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The environment of a non-editable install: the package from its wheel, first on the
    path; its dependencies are this machine's."""
    root = tmp_path_factory.mktemp("image")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--disable-pip-version-check", "-w", str(root / "dist"), str(ROOT)],
                   check=True, cwd=root)
    (wheel,) = (root / "dist").glob("gristmill-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--disable-pip-version-check", "--target", str(root / "site"), str(wheel)],
                   check=True, cwd=root)
    return {"PATH": os.environ["PATH"], "PYTHONPATH": str(root / "site")}


def test_the_installed_package_carries_its_migrations(installed, tmp_path):
    probe = ("import gristmill, pathlib; root = pathlib.Path(gristmill.__file__).parent; "
             "print(root); print(sorted(p.name for p in (root / 'store/migrations').glob('*.sql')))")
    where, migrations = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True,
                                       env=installed, capture_output=True, text=True
                                       ).stdout.splitlines()
    assert where.startswith(installed["PYTHONPATH"])
    assert "0001_queue.sql" in migrations and "0002_flows.sql" in migrations


def test_a_job_pods_command_runs_from_the_installed_package(installed, tmp_path):
    from gristmill.sandbox.base import JobRequest
    from gristmill.sandbox.pod_job import PAYLOAD_KEY, job_payload

    request = JobRequest(job_id="j-1", language="python", input={"n": 4},
                         code="def main(n: int):\n    print('squaring', n)\n    return n * n\n")
    # What job_pod() puts in the container: `python -m gristmill.sandbox.pod_job` on the
    # job's Secret, mounted as a file; cwd /work.
    secret = tmp_path / PAYLOAD_KEY
    secret.write_bytes(job_payload(request, "#m# "))
    (tmp_path / "work").mkdir()
    done = subprocess.run([sys.executable, "-m", "gristmill.sandbox.pod_job", str(secret)],
                          cwd=tmp_path / "work", env=installed, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    *output, last = done.stdout.splitlines()
    assert output == ["squaring 4"]
    assert json.loads(last.removeprefix("#m# ")) == {"ok": True, "result": 16, "error": None}


def test_the_image_installs_the_package_this_way():
    dockerfile = (ROOT / "worker_image" / "Dockerfile").read_text()
    assert "pip install --no-cache-dir /src" in dockerfile
    assert 'ENTRYPOINT ["gristmill"]' in dockerfile  # the Deployment's args start with `worker`
