"""The OpenAPI document: it is served, it is valid OpenAPI 3.1, it documents exactly the
routes there are, and schemathesis finds nothing against a live server with every
check on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from openapi_spec_validator import validate

from gristmill.api import openapi
from gristmill.api.app import ROUTES, create_app
from tests.apikit import AUTH, api_process, apply_examples

CONFIG = Path(__file__).parent / "schemathesis.toml"


def test_every_route_is_documented_and_every_documented_operation_routed():
    app = create_app("postgresql://unused/x")
    routed = {(route.method, route.resource.canonical) for route in app.router.routes()}
    assert routed == {(method, path) for method, path, _, _ in ROUTES}
    documented = {(method.upper(), path) for path, item in openapi.document()["paths"].items()
                  for method in item}
    assert routed == documented


def test_the_document_is_valid_openapi_3_1_and_its_references_resolve():
    document = openapi.document()
    validate(document)
    text = json.dumps(document)
    for ref in set(re.findall(r'"\$ref": "#/components/(\w+)/(\w+)"', text)):
        assert ref[1] in document["components"][ref[0]], ref
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


@pytest.mark.timeout(300)
async def test_schemathesis_finds_nothing_with_every_check_on(database_url, tmp_path):
    await apply_examples(database_url)
    log_path = tmp_path / "api.log"
    with api_process(database_url, log_path=log_path) as (url, process):
        request = urllib.request.Request(f"{url}/api/v1/openapi.json", headers=AUTH)
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.loads(response.read()) == openapi.document()
        # One worker: schemathesis' threads trip a CPython 3.11 race in ast (gh-106905).
        result = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run",
             f"{url}/api/v1/openapi.json", "--checks", "all", "--max-examples", "80",
             "--workers", "1", "--request-timeout", "10", "--no-color",
             "--header", f"Authorization: {AUTH['Authorization']}"],
            capture_output=True, text=True, timeout=280, cwd=tmp_path)  # its cache stays out
        assert process.poll() is None
    report = result.stdout[-6000:]
    assert result.returncode == 0, report
    assert re.search(r"(\d+) generated, \1 passed", report), report
    api_log = log_path.read_text()
    assert "Traceback" not in api_log and "unexpected error" not in api_log, api_log[-4000:]
