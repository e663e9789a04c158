"""A WorkerGroup's image, pull secrets and name: what reaches its Deployment."""

from __future__ import annotations

import pytest
from crdkit import schema_of
from kubernetes_validate import validate as k8s_validate
from kubernetes_validate.utils import latest_version
from pydantic import ValidationError
from test_chart import by_kind, render

from gristmill.operator.deployment import deployment_name, worker_deployment
from gristmill.spec import WorkerGroup
from gristmill.spec.workergroup import DEFAULT_WORKER_IMAGE, MAX_NAME_LENGTH


def group(spec: dict, name: str = "g") -> WorkerGroup:
    return WorkerGroup.model_validate({"metadata": {"name": name, "namespace": "team-a"},
                                       "spec": {"tags": ["python"], **spec}})


def container_of(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("executor", ["process", "pod"])
def test_a_group_without_an_image_runs_the_operators_image(executor):
    installed = "registry.local/gristmill:1.2.3"
    plain = worker_deployment(group({"executor": executor}), "db", default_image=installed)
    assert container_of(plain)["image"] == installed
    own = worker_deployment(group({"executor": executor, "image": "mine:1"}), "db",
                            default_image=installed)
    assert container_of(own)["image"] == "mine:1"
    if executor == "pod":  # job pods run the group's image too
        env = {e["name"]: e.get("value") for e in container_of(plain)["env"]}
        assert env["GRISTMILL_JOB_IMAGE"] == installed
    # Told nothing, the operator runs the image of its own version.
    assert container_of(worker_deployment(group({}), "db"))["image"] == DEFAULT_WORKER_IMAGE
    # The CRD has no default to freeze into stored objects.
    assert "default" not in schema_of("WorkerGroup")["properties"]["spec"]["properties"][
        "image"]


def test_the_chart_tells_the_operator_its_image():
    from gristmill.cli import build_parser

    operator = by_kind(render({"image": {"repository": "registry.local/gm", "tag": "dev"}}),
                       "Deployment")["gristmill-operator"]
    args = container_of(operator)["args"]
    assert "--worker-image=registry.local/gm:dev" in args
    parsed = build_parser().parse_args([*args, "--database-url", "postgresql://x/y"])
    assert parsed.worker_image == "registry.local/gm:dev" == container_of(operator)["image"]


@pytest.mark.parametrize("version", ["1.30.0", latest_version()])
def test_image_pull_secrets_reach_the_worker_pods(version):
    deployment = worker_deployment(group({"imagePullSecrets": [{"name": "registry"}]}), "db")
    assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    k8s_validate(deployment, version, strict=True)
    assert "imagePullSecrets" not in worker_deployment(group({}), "db")["spec"]["template"][
        "spec"]


def test_names_that_would_not_fit_their_deployment_are_refused():
    longest = "a" * MAX_NAME_LENGTH
    assert len(deployment_name(longest)) == 63 and deployment_name(longest).endswith(longest)
    with pytest.raises(ValidationError) as caught:
        group({}, name=longest + "a")
    (error,) = caught.value.errors()
    assert error["loc"] == ("metadata", "name")
    assert "at most 45 characters for a WorkerGroup (its Deployment gristmill-workers-<name> " \
           "must fit in 63)" in error["msg"]
