"""`gristmill setup`, the chart's pre-install/pre-upgrade hook, against the real API server,
as the hook's ServiceAccount under exactly the RBAC the chart renders for it: it brings an
old CRD up to date, makes the bundled database's Secret and the worker-token key's once
and keeps them, and may read no other Secret."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import helm_python as helm
import pytest
import yaml
from clusterkit import ROOT, apply, get, kubectl

from gristmill.spec.crds import KINDS, crd

NAMESPACE = "gristmill-setup-test"
HOOK_OBJECTS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


def hook_objects() -> list[dict]:
    rendered = helm.Chart.load(ROOT / "charts/gristmill").render(None, name="gm",
                                                                namespace=NAMESPACE,
                                                                is_install=True)
    objects = [o for path, text in rendered.items() if path.endswith(".yaml")
               for o in yaml.safe_load_all(text) if o]
    return [o for o in objects if o["metadata"]["name"] == "gristmill-setup"
            and o["kind"] in HOOK_OBJECTS]


def setup(cluster, kubeconfig, *args: str) -> subprocess.CompletedProcess:
    env = {"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT / "operator")}
    return subprocess.run([sys.executable, "-m", "gristmill.cli", "setup", *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def hook_kubeconfig(crds):
    crds.control_plane.ensure_namespace(NAMESPACE)
    for obj in hook_objects():
        apply(crds, obj)
    token = crds.control_plane.service_account_token(NAMESPACE, "gristmill-setup")
    return crds.control_plane.kubeconfig(token, "gristmill-setup")


def test_setup_brings_an_old_crd_up_to_date(crds, hook_kubeconfig):
    # What `helm upgrade` leaves behind: the CRD of an older version (here, one without
    # its printer columns and without a field), created by someone else.
    (scripts,) = [crd(k) for k in KINDS if k.plural == "scripts"]
    old = json.loads(json.dumps(scripts))
    version = old["spec"]["versions"][0]
    version.pop("additionalPrinterColumns")
    del version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["timeout"]
    kubectl(crds, "replace", "-f", "-", input=json.dumps({
        **old, "metadata": {**old["metadata"], "resourceVersion": get(
            crds, "crd", "scripts.gristmill.io")["metadata"]["resourceVersion"]}}))

    done = setup(crds, hook_kubeconfig, "--crds")
    assert done.returncode == 0, done.stderr
    assert "applied CRD scripts.gristmill.io" in done.stdout
    served = get(crds, "crd", "scripts.gristmill.io")["spec"]["versions"][0]
    assert served["additionalPrinterColumns"] == scripts["spec"]["versions"][0][
        "additionalPrinterColumns"]
    assert "timeout" in served["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


def test_setup_makes_the_database_secret_once_and_reads_no_other(crds, hook_kubeconfig):
    args = ("--database-secret", "gristmill-database", "--database-host", "gm-postgres",
            "-n", NAMESPACE)
    first = setup(crds, hook_kubeconfig, *args)
    assert first.returncode == 0 and "created Secret" in first.stdout, first.stderr
    data = get(crds, "secret", "gristmill-database", "-n", NAMESPACE)["data"]
    password = base64.b64decode(data["password"]).decode()
    assert len(password) >= 24
    assert base64.b64decode(data["url"]).decode() == (
        f"postgresql://gristmill:{password}@gm-postgres:5432/gristmill")

    again = setup(crds, hook_kubeconfig, *args)  # the next upgrade
    assert again.returncode == 0 and "kept Secret" in again.stdout, again.stderr
    assert get(crds, "secret", "gristmill-database", "-n", NAMESPACE)["data"] == data

    # Its Role names that one Secret: another is out of its reach.
    kubectl(crds, "create", "secret", "generic", "other", "-n", NAMESPACE,
            "--from-literal=key=value")
    refused = kubectl(crds, "get", "secret", "other", "-n", NAMESPACE, check=False,
                      kubeconfig=hook_kubeconfig)
    assert refused.returncode != 0 and "forbidden" in refused.stderr


def test_setup_makes_the_worker_token_key_once_and_keeps_it(crds, hook_kubeconfig):
    from gristmill.dispatch import tokens

    # What the chart's hook Job runs.
    (job,) = [o for path, text in helm.Chart.load(ROOT / "charts/gristmill").render(
        None, name="gm", namespace=NAMESPACE, is_install=True).items()
        if path.endswith("setup.yaml") for o in yaml.safe_load_all(text)
        if o and o["kind"] == "Job"]
    args = [a for a in job["spec"]["template"]["spec"]["containers"][0]["args"]
            if a.startswith(("--worker-token-secret", "--namespace"))]
    assert args == ["--worker-token-secret=gm-worker-token-key", f"--namespace={NAMESPACE}"]

    first = setup(crds, hook_kubeconfig, *args)
    assert first.returncode == 0, first.stderr
    assert f"created Secret {NAMESPACE}/gm-worker-token-key" in first.stdout
    data = get(crds, "secret", "gm-worker-token-key", "-n", NAMESPACE)["data"]
    (key,) = tokens.parse_keys(base64.b64decode(data["keys"]).decode())
    assert len(key) >= tokens.MIN_KEY_BYTES

    again = setup(crds, hook_kubeconfig, *args)  # the next upgrade
    assert again.returncode == 0, again.stderr
    assert f"kept Secret {NAMESPACE}/gm-worker-token-key" in again.stdout
    assert get(crds, "secret", "gm-worker-token-key", "-n", NAMESPACE)["data"] == data

    # A rotation in progress (two keys) is kept too; a Secret without keys is an error.
    two = base64.b64encode(f"{tokens.new_key()},{base64.b64decode(data['keys']).decode()}"
                           .encode()).decode()
    kubectl(crds, "patch", "secret", "gm-worker-token-key", "-n", NAMESPACE, "--type=merge",
            "-p", json.dumps({"data": {"keys": two}}))
    kept = setup(crds, hook_kubeconfig, *args)
    assert kept.returncode == 0 and "kept Secret" in kept.stdout, kept.stderr
    assert get(crds, "secret", "gm-worker-token-key", "-n", NAMESPACE)["data"]["keys"] == two
    kubectl(crds, "patch", "secret", "gm-worker-token-key", "-n", NAMESPACE, "--type=json",
            "-p", json.dumps([{"op": "remove", "path": "/data/keys"}]))
    broken = setup(crds, hook_kubeconfig, *args)
    assert broken.returncode == 1 and "exists without the key `keys`" in broken.stderr


def test_setup_without_its_rights_says_what_the_api_server_refused(crds):
    crds.control_plane.ensure_namespace(NAMESPACE)
    token = crds.control_plane.service_account_token(NAMESPACE, "nobody")
    refused = setup(crds, crds.control_plane.kubeconfig(token, "nobody"), "--crds")
    assert refused.returncode == 1
    assert "the API server refused (403 Forbidden)" in refused.stderr
    assert "customresourcedefinitions" in refused.stderr
