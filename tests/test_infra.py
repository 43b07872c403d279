"""What ``infra/`` deploys names things that exist: entrypoints, options, the Ray version; and
it holds no secret.

Every manifest parses; every RayJob entrypoint (also the one the nightly CronJob creates) is
parsed by the real command line, so renaming a job script or an option fails here; the
RayService's Serve config validates against Ray Serve's own schema and its application's
import path and arguments build a real ``ServeConfig``; secrets come from a Secret or the
service account, never inline; the image's Ray is the project's pin.
Every manifest also validates offline: Kubernetes kinds with kubernetes-validate (the
Kubernetes OpenAPI schemas it ships, strict: unknown fields refused), KubeRay kinds with
``infra/schemas/kuberay-v1.json`` (their spec fields, from KubeRay's ray.io/v1 Go types) and
their pod templates again with kubernetes-validate.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.cli import config_from_args
from pipeline.serve.config import config_from_strings

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "infra" / "k8s").glob("*.yaml"))
APP = "/home/ray/app/"  # where the Dockerfile puts the repository's files
JOB_COMMANDS = {"embed.py": "run", "nightly_reembed.py": "nightly", "enrich.py": "enrich"}
KUBERNETES = "1.33"  # the schema version validated against
KUBERAY_SCHEMA = REPO / "infra" / "schemas" / "kuberay-v1.json"
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


def documents() -> list[dict]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            docs.append(doc)
            if doc["kind"] == "ConfigMap":  # a manifest the CronJob creates
                docs += [d for text in doc.get("data", {}).values()
                         for d in yaml.safe_load_all(text) if isinstance(d, dict) and "kind" in d]
    return docs


def pinned_ray() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(re.search(r"==([\d.]+)", d).group(1) for d in deps if d.startswith("ray["))


def test_every_manifest_parses_with_kind_and_name():
    assert {p.name for p in MANIFESTS} >= {"rayjob-embed.yaml", "raycluster.yaml", "nightly.yaml",
                                           "rayservice.yaml"}
    kinds = [d["kind"] for d in documents()]
    assert kinds.count("RayJob") == 2 and "RayCluster" in kinds and "CronJob" in kinds
    assert kinds.count("RayService") == 1
    for doc in documents():
        assert doc["apiVersion"] and (doc["metadata"].get("name") or doc["metadata"].get("generateName"))


def test_rayjob_entrypoints_name_existing_jobs_and_options():
    jobs = [d for d in documents() if d["kind"] == "RayJob"]
    for job in jobs:
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "python" and argv[1].startswith(APP), argv
        script = argv[1].removeprefix(APP)
        assert (REPO / script).is_file(), f"{script} does not exist"
        command = JOB_COMMANDS[Path(script).name]
        args = build_parser().parse_args([command, *argv[2:]])  # SystemExit on an unknown option
        config_from_args(args)
    scripts = {Path(shlex.split(j["spec"]["entrypoint"])[1]).name for j in jobs}
    assert scripts == {"embed.py", "nightly_reembed.py"}


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}")
def test_no_inline_secrets(doc):
    assert doc["kind"] != "Secret", "secrets are created from the environment, not committed"

    def walk(node):
        if isinstance(node, dict):
            if "name" in node and "value" in node and SECRET_NAME.search(str(node["name"])):
                pytest.fail(f"{doc['kind']}: {node['name']} is set inline")
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)
        elif isinstance(node, str):
            yield node

    for text in walk(doc):
        assert not re.search(r"AKIA[0-9A-Z]{12,}|aws_secret_access_key\s*=", text), text


def cluster_spec(doc: dict) -> dict | None:
    """The Ray cluster a KubeRay kind starts (None for other kinds)."""
    return {"RayJob": lambda: doc["spec"]["rayClusterSpec"], "RayCluster": lambda: doc["spec"],
            "RayService": lambda: doc["spec"]["rayClusterConfig"]}.get(doc["kind"],
                                                                         lambda: None)()


def test_ray_clusters_use_the_pinned_ray_and_the_credentials_secret():
    pin = pinned_ray()
    for doc in documents():
        spec = cluster_spec(doc)
        if spec is None:
            continue
        assert str(spec["rayVersion"]) == pin
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == "nomic-pipeline"
            for container in pod["containers"]:
                assert container["envFrom"] == [{"secretRef": {"name": "nomic-pipeline-aws",
                                                               "optional": True}}]
        gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-encode"]
        limits = gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"


def test_dockerfile_builds_on_the_pinned_ray_image():
    text = (REPO / "infra" / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1) == pinned_ray()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON\}-\$\{VARIANT\}$",
                     text, re.M)
    assert re.search(r"^ARG VARIANT=gpu$", text, re.M)  # GPU by default, cpu by build argument
    assert re.search(r'^ARG PREFETCH_MODEL=""$', text, re.M)  # no weights unless asked
    for copied in re.findall(r"^COPY \S+ (.+) \./", text, re.M):
        for name in copied.split():
            assert (REPO / name).exists(), f"the Dockerfile copies {name}, which does not exist"


def kuberay_validator(kind: str) -> jsonschema.Draft7Validator:
    import json

    schema = json.loads(KUBERAY_SCHEMA.read_text())
    return jsonschema.Draft7Validator({**schema, "$ref": f"#/definitions/{kind}"})


def pod_templates(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [g["template"] for g in groups]


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}")
def test_manifest_validates_against_its_schema(doc):
    if doc["apiVersion"].startswith("ray.io/"):
        kuberay_validator(doc["kind"]).validate(doc)
        for template in pod_templates(doc):
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                 "template": template}, KUBERNETES, strict=True)
    else:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_validators_refuse_what_they_should():
    job = next(d for d in documents() if d["kind"] == "RayJob")
    bad = {**job, "spec": {**job["spec"], "entrypointt": "python x.py"}}  # a misspelt field
    with pytest.raises(jsonschema.ValidationError):
        kuberay_validator("RayJob").validate(bad)
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    with pytest.raises(jsonschema.ValidationError):  # replicas must be an integer
        kuberay_validator("RayJob").validate(
            {**job, "spec": {**job["spec"], "rayClusterSpec": {
                **job["spec"]["rayClusterSpec"], "workerGroupSpecs": [{**group, "replicas": "2"}]}}})
    template = pod_templates(job)[0]
    container = dict(template["spec"]["containers"][0], imagee="x")  # not a container field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
             "template": {**template, "spec": {**template["spec"], "containers": [container]}}},
            KUBERNETES, strict=True)
    service = next(d for d in documents() if d["kind"] == "RayService")
    with pytest.raises(jsonschema.ValidationError):  # a misspelt RayService field
        kuberay_validator("RayService").validate(
            {**service, "spec": {**service["spec"], "serveConfig": "x"}})
    cron = next(d for d in documents() if d["kind"] == "CronJob")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**cron, "spec": {**cron["spec"], "schedule": 2}},
                                     KUBERNETES, strict=True)


def test_the_rayservice_serves_our_application_with_real_options():
    from ray.serve.schema import ServeDeploySchema

    service = next(d for d in documents() if d["kind"] == "RayService")
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    module, _, name = app.import_path.partition(":")
    assert (module, name) == ("pipeline.serve.app", "app_builder")
    import importlib

    assert callable(getattr(importlib.import_module(module), name))
    config = config_from_strings(app.args)  # ValueError on an option the service lacks
    assert config.device == "cuda" and config.expect_output.endswith("/_LATEST")
    gpu = [g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
           if g["groupName"] == "gpu-encode"]
    assert config.replicas == gpu[0]["replicas"]  # one encoder replica per GPU worker
    with pytest.raises(ValueError, match="unknown serve option"):
        config_from_strings({**app.args, "dimension": "256"})
    from pipeline.serve.app import Limits

    for deployment in app.deployments:  # an override of the ingress's limits is complete
        assert deployment.name == "Ingress"
        Limits(**deployment.user_config)
