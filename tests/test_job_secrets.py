"""Secrets for jobs, without a cluster: the spec, reading them into a job's env, masking,
the job pod's references and runner, the operator's Role, and dev mode's files."""

from __future__ import annotations

import base64
import copy

import pytest
from flowkit import apply_yaml
from flowkit import script as script_yaml
from pydantic import ValidationError
from test_worker import start_worker, submit, wait_status

from gristmill.jobsecrets.from_files import FileSecrets, load_secrets
from gristmill.jobsecrets.masking import MASK, Masker, masked_outcome
from gristmill.jobsecrets.resolve import SecretProblem, resolve
from gristmill.operator.secret_access import (
    declared_secrets,
    namespace_secrets,
    secrets_conditions,
    secrets_role,
    secrets_role_binding,
    worker_accounts,
)
from gristmill.sandbox.base import JobOutcome, JobRequest, SecretEnvFrom, SecretKeyRef
from gristmill.sandbox.pod_job import secret_environment
from gristmill.sandbox.pod_objects import job_pod
from gristmill.sandbox.pod_status import config_problem
from gristmill.spec import Flow, Script
from gristmill.store import logs
from gristmill.worker.jobs import plan_job

BASE = {"apiVersion": "gristmill.io/v1alpha1", "kind": "Script",
        "metadata": {"name": "s", "namespace": "team-a"}}
REF = {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db-creds",
                                                             "key": "password"}}}


def script(**spec) -> Script:
    return Script.model_validate({**BASE, "spec": {"language": "bash", "code": "echo", **spec}})


# ---- spec ------------------------------------------------------------------------------------

def test_env_takes_values_secret_keys_and_whole_secrets():
    found = script(env=[{"name": "PLAIN", "value": "x"}, REF],
                   envFrom=[{"secretRef": {"name": "api.keys", "optional": True},
                             "prefix": "API_"}]).spec
    assert found.secret_names() == ["api.keys", "db-creds"]
    assert found.secret_names(required_only=True) == ["db-creds"]
    plan = plan_job("v1", found.model_dump(mode="json"))
    assert plan.env == {"PLAIN": "x"}  # a reference is never a value
    assert plan.secret_env == (SecretKeyRef("DB_PASSWORD", "db-creds", "password"),)
    assert plan.secret_env_from == (SecretEnvFrom("api.keys", "API_", optional=True),)


@pytest.mark.parametrize("env, env_from, where", [
    ([{**REF, "value": "also"}], [], "give `value` or `valueFrom`, not both"),
    ([{"name": "A", "valueFrom": {"secretKeyRef": {"name": "Bad_Name", "key": "k"}}}], [],
     "env.0.valueFrom.secretKeyRef.name"),
    ([{"name": "A", "valueFrom": {"secretKeyRef": {"name": "a" * 254, "key": "k"}}}], [],
     "env.0.valueFrom.secretKeyRef.name"),
    ([{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "a/b"}}}], [],
     "env.0.valueFrom.secretKeyRef.key"),
    ([{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s"}}}], [],
     "env.0.valueFrom.secretKeyRef.key"),
    ([{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "s", "key": "k"}}}], [],
     "env.0.valueFrom"),
    ([{"name": "1A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}], [],
     "env.0.name"),
    ([], [{"secretRef": {"name": "-s"}}], "envFrom.0.secretRef.name"),
    ([], [{"secretRef": {"name": "s"}, "prefix": "9X"}], "envFrom.0.prefix"),
    ([], [{"configMapRef": {"name": "s"}}], "envFrom.0"),
    ([REF, REF], [], "DB_PASSWORD given more than once"),
])
def test_bad_references_are_refused_naming_the_field(env, env_from, where):
    with pytest.raises(ValidationError) as refused:
        script(env=env, envFrom=env_from)
    assert where in str(refused.value).replace("\n  ", " ")


def test_an_inline_flow_step_cannot_read_secrets():
    flow = {"apiVersion": "gristmill.io/v1alpha1", "kind": "Flow",
            "metadata": {"name": "f", "namespace": "team-a"},
            "spec": {"steps": [{"id": "a", "inline": {"language": "bash", "code": "echo",
                                                      "env": [REF]}}]}}
    with pytest.raises(ValidationError, match="an inline step cannot read Secrets"):
        Flow.model_validate(flow)


# ---- reading them ----------------------------------------------------------------------------

class Secrets:
    def __init__(self, **secrets: dict[str, bytes]):
        self.secrets, self.reads = secrets, []

    def read(self, namespace, name):
        self.reads.append((namespace, name))
        return self.secrets.get(name)


def test_env_wins_over_env_from_and_only_declared_secrets_are_read():
    reader = Secrets(**{"db-creds": {"password": b"pw-from-key", "user": b"app"},
                        "unused": {"x": b"never"}})
    found = resolve("team-a", (SecretEnvFrom("db-creds", "DB_"), SecretEnvFrom("gone", "",
                                                                               True)),
                    (SecretKeyRef("DB_user", "db-creds", "password"),
                     SecretKeyRef("OPT", "db-creds", "missing-key", optional=True)), reader)
    assert found.env == {"DB_password": "pw-from-key", "DB_user": "pw-from-key"}
    assert reader.reads == [("team-a", "db-creds"), ("team-a", "gone")]  # each once


@pytest.mark.parametrize("secrets, message", [
    ({}, "Secret team-a/db-creds not found: create it or mark the reference optional"),
    ({"db-creds": {"other": b"x"}},
     "Secret team-a/db-creds has no key password: add it or mark the reference optional"),
    ({"db-creds": {"password": b"a\x00b"}}, "holds a NUL byte"),
    ({"db-creds": {"password": b"\xff\xfe"}}, "is not UTF-8 text"),
])
def test_what_cannot_be_had_says_which_secret_and_what_to_do(secrets, message):
    with pytest.raises(SecretProblem, match=message.replace(".", r"\.")):
        resolve("team-a", (), (SecretKeyRef("P", "db-creds", "password"),), Secrets(**secrets))


# ---- masking ---------------------------------------------------------------------------------

def test_values_are_masked_across_chunk_boundaries_and_short_ones_are_not():
    masker = Masker(["hunter2-secret", "abc", "-----BEGIN KEY-----\nbase64body==\n"])
    text = "login hunter2-secret ok; abc stays; key base64body== end hunter2-secre"
    for size in (1, 2, 3, 5, 7, 64):
        shown: list[str] = []
        stream = masker.stream(shown.append)
        for at in range(0, len(text), size):
            stream.feed(text[at:at + size])
        stream.flush()
        assert "".join(shown) == (f"login {MASK} ok; abc stays; key {MASK} end "
                                  f"hunter2-secre"), size
    assert masker.mask("hunter2-secrethunter2-secret") == MASK * 2


def test_results_and_errors_are_masked_keys_too():
    masker = Masker(["s3cr3t-value"])
    outcome = masked_outcome(masker, JobOutcome(ok=True, result={
        "s3cr3t-value": ["x s3cr3t-value y", 1, None, {"n": 2.5}]}))
    assert outcome.result == {MASK: [f"x {MASK} y", 1, None, {"n": 2.5}]}
    failed = masked_outcome(masker, JobOutcome(ok=False, error={
        "kind": "exception", "message": "bad s3cr3t-value", "traceback": "s3cr3t-value"}))
    assert failed.error == {"kind": "exception", "message": f"bad {MASK}", "traceback": MASK}


# ---- the job pod -----------------------------------------------------------------------------

def test_a_job_pod_names_its_secrets_and_its_runner_renames_them():
    request = JobRequest(job_id="0123456789abcdef", language="bash", code="echo", input={},
                         secret_env=(SecretKeyRef("DB_PASSWORD", "db-creds", "password"),),
                         secret_env_from=(SecretEnvFrom("api", "API_", optional=True),
                                          SecretEnvFrom("db-creds")))
    (container,) = job_pod(request, "img", 60, "w", "uid")["spec"]["containers"]
    assert container["env"] == [{"name": "GRISTMILL_SECRET_ENV_DB_PASSWORD", "valueFrom": {
        "secretKeyRef": {"name": "db-creds", "key": "password", "optional": False}}}]
    assert container["envFrom"] == [
        {"secretRef": {"name": "api", "optional": True}, "prefix": "GRISTMILL_SECRET_FROM_0_API_"},
        {"secretRef": {"name": "db-creds", "optional": False},
         "prefix": "GRISTMILL_SECRET_FROM_1_"}]
    # What the kubelet sets, as the runner passes it on: later envFrom, then env, win.
    kubelet_env = {"PATH": "/bin", "HOSTNAME": "pod", "GRISTMILL_SECRET_FROM_0_API_KEY": "k1",
                   "GRISTMILL_SECRET_FROM_1_API_KEY": "k2",
                   "GRISTMILL_SECRET_FROM_1_DB_PASSWORD": "from-envfrom",
                   "GRISTMILL_SECRET_ENV_DB_PASSWORD": "from-env"}
    assert secret_environment(kubelet_env) == {"API_KEY": "k2", "DB_PASSWORD": "from-env"}


def test_the_kubelets_config_errors_become_what_to_do():
    assert config_problem('CreateContainerConfigError: secret "db-creds" not found',
                          "team-a") == ("Secret team-a/db-creds not found: create it or mark "
                                        "the reference optional")
    assert config_problem("CreateContainerConfigError: couldn't find key password in Secret "
                          "team-a/db-creds", "team-a") == (
        "Secret team-a/db-creds has no key password: add it or mark the reference optional")
    assert config_problem("ErrImagePull: nope", "team-a") is None


# ---- the operator's Role ---------------------------------------------------------------------

def test_the_role_names_the_union_of_declared_secrets_and_never_none():
    scripts = [{"metadata": {}, "spec": {"env": [REF, {"name": "X", "value": "y"}]}},
               {"metadata": {}, "spec": {"envFrom": [{"secretRef": {"name": "api",
                                                                    "optional": True}}]}},
               {"metadata": {"deletionTimestamp": "now"}, "spec": {"envFrom": [
                   {"secretRef": {"name": "deleted"}}]}},
               {"metadata": {}, "spec": {"env": [{"name": "A", "valueFrom": {
                   "secretKeyRef": {"name": "../../etc", "key": "k"}}}, "junk"]}}]
    assert namespace_secrets(scripts) == ["api", "db-creds"]
    assert declared_secrets(scripts[1]["spec"], required_only=True) == set()
    (rule,) = secrets_role("team-a", ["api", "db-creds"])["rules"]
    assert rule == {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                    "resourceNames": ["api", "db-creds"]}
    with pytest.raises(ValueError, match="allows every Secret"):
        secrets_role("team-a", [])
    groups = [{"metadata": {"name": "proc"}, "spec": {}},
              {"metadata": {"name": "mine"}, "spec": {"serviceAccountName": "own"}},
              {"metadata": {"name": "pods"}, "spec": {"executor": "pod"}}]
    binding = secrets_role_binding("team-a", worker_accounts(groups),
                                   "system:serviceaccount:gristmill:gristmill-operator")
    assert [s["name"] for s in binding["subjects"]] == [
        "gristmill-workers-proc", "own", "system:serviceaccount:gristmill:gristmill-operator"]


def test_a_missing_secret_turns_the_script_not_ready_and_back():
    stored = [{"type": "Ready", "status": "True", "reason": "Stored", "message": "m",
               "lastTransitionTime": "t"}]
    missing = secrets_conditions(copy.deepcopy(stored), ["db-creds"], None, "team-a", 3, stored)
    assert [(c["type"], c["status"], c["reason"]) for c in missing] == [
        ("Ready", "False", "SecretNotFound"), ("SecretsAvailable", "False", "SecretNotFound")]
    assert missing[0]["message"].startswith("Secret team-a/db-creds not found")
    found = secrets_conditions(copy.deepcopy(stored), [], None, "team-a", 3, missing)
    assert [(c["type"], c["status"]) for c in found] == [("Ready", "True"),
                                                          ("SecretsAvailable", "True")]


# ---- gristmill dev ---------------------------------------------------------------------------

def test_dev_reads_secret_manifests_with_data_and_string_data(tmp_path):
    (tmp_path / "secrets.yaml").write_text(f"""
apiVersion: v1
kind: Secret
metadata: {{name: db-creds, namespace: team-a}}
data: {{password: {base64.b64encode(b"pw").decode()}}}
stringData: {{user: "app: 'quoted' \\u00e9"}}
---
apiVersion: gristmill.io/v1alpha1
kind: Script
metadata: {{name: s}}
---
kind: Secret
metadata: {{name: plain}}
stringData: {{key: value}}
""")
    reader = FileSecrets([tmp_path])
    assert reader.read("team-a", "db-creds") == {"password": b"pw",
                                                 "user": "app: 'quoted' é".encode()}
    assert reader.read("default", "plain") == {"key": b"value"}
    assert reader.read("team-a", "plain") is None


@pytest.mark.parametrize("text, message", [
    ("kind: Secret\nmetadata: {name: Bad}\n", "metadata.name, a DNS-1123 subdomain"),
    ("kind: Secret\nmetadata: {name: s, namespace: [x]}\n", "metadata.namespace"),
    ("kind: Secret\nmetadata: {name: s}\ndata: {k: '%%%'}\n", "data.k is not base64"),
    ("kind: Secret\nmetadata: {name: s}\nstringData: {k: 5}\n", "must be a string"),
    ("kind: Secret\nmetadata: {name: s}\nstringData: {'a/b': x}\n", "must match"),
    ("kind: Secret\nmetadata: {name: s}\nstringData: [1]\n", "must map keys"),
    ("kind: Secret\nmetadata: [\n", "cannot read the Secrets"),
    ("kind: Secret\nmetadata: 7\n", "needs metadata.name"),
])
def test_hostile_secret_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SecretProblem, match=message.replace(".", r"\.")):
        load_secrets([path])


# ---- a real worker, as `gristmill dev` starts it ---------------------------------------------

SECRET_SCRIPTS = script_yaml("prints-secret", """
    import os, sys, time

    def main():
        value = os.environ["DB_PASSWORD"]
        for ch in value:  # a chunk per character: masking must see across them
            sys.stdout.write(ch)
            sys.stdout.flush()
            time.sleep(0.02)
        print()
        print("user", os.environ["DB_user"], "and", value)
        return {"echo": value, "n": len(value)}
    """, env='[{name: DB_PASSWORD, valueFrom: {secretKeyRef: {name: db-creds, key: password}}}]',
    envFrom='[{secretRef: {name: db-creds}, prefix: DB_}]') + script_yaml(
    "needs-missing", "def main():\n    return 1\n",
    env='[{name: X, valueFrom: {secretKeyRef: {name: not-in-the-file, key: k}}}]')


async def test_a_dev_worker_reads_secret_manifests_and_masks_what_the_job_prints(
        db, database_url, tmp_path):
    await apply_yaml(db, SECRET_SCRIPTS)
    (tmp_path / "secrets.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: db-creds}\n"
        "stringData: {password: 'p4ss w0rd, with \"quotes\"', user: app}\n")
    worker = start_worker(database_url, "--secrets", str(tmp_path))
    try:
        job_id = await submit(db, "prints-secret", {})
        job = await wait_status(db, job_id, ("succeeded", "failed"), timeout=60)
        assert job["status"] == "succeeded", job["error"]
        assert job["result"] == {"echo": MASK, "n": 24}
        text = "".join(chunk for _, chunk in await logs.read(db, job_id))
        assert "p4ss" not in text and f"{MASK}\nuser app and {MASK}\n" in text
        missing = await wait_status(db, await submit(db, "needs-missing", {}),
                                    ("succeeded", "failed"), timeout=60)
        assert missing["error"]["message"] == ("Secret default/not-in-the-file not found: "
                                               "create it or mark the reference optional")
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def test_a_large_value_is_masked_in_small_chunks_without_quadratic_cost():
    value = "k" + "ey-material/" * 20_000  # 240 KB, as a certificate bundle might be
    masker = Masker([value])
    shown: list[str] = []
    stream = masker.stream(shown.append)
    text = f"before {value} after"
    for at in range(0, len(text), 4096):
        stream.feed(text[at:at + 4096])
    stream.flush()
    assert "".join(shown) == f"before {MASK} after"
