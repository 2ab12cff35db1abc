"""deploy/k8s: every overlay renders, validates against the Kubernetes schemas, and
agrees with what the server and worker really serve.

Rendering uses the real ``kubectl kustomize``; built-in kinds are validated offline by
``kubernetes-validate`` (strict: unknown fields fail), KEDA and Prometheus Operator
kinds by ``tests.support.k8s_crds``. Ports, the grace period, consumer group and topic
are read from the settings each container would load (its ConfigMap files, its env,
its working directory), not hard-coded here; metric names from a real server's
``/metrics``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from devstack.services import KafkaBroker
from devstack.stack import DevOptions
from feature_streams.definitions import load_definitions
from feature_streams.stream_job import WorkerConfig
from protos.streamscore.v1 import scoring_pb2 as pb
from server.cli import build_parser
from server.settings import Settings, load_settings
from tests.conftest import TEST_FEATURES, free_port
from tests.support.k8s_crds import CRD_SCHEMAS
from tests.support.server import running_server

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
KUBECTL = shutil.which("kubectl")
#: Oldest Kubernetes minor the manifests support, and the newest schemas bundled.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
#: Secrets prod expects from the secret store (deploy/k8s/README.md "Secrets"), by keys.
EXTERNAL_SECRETS = {
    "streamscore-admin-token": ("token",),
    "streamscore-admin-tls": ("tls.crt", "tls.key", "ca.crt"),
}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (renders the overlays)"),
]

Obj = dict[str, Any]


def _render(overlay: Path) -> list[Obj]:
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    """Every overlay, rendered once for the module."""
    return {name: _render(K8S / "overlays" / name) for name in OVERLAYS}


def _one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _generated(objects: list[Obj], kind: str, prefix: str) -> Obj:
    """A generated ConfigMap/Secret by its name before the content hash."""
    found = [
        o
        for o in objects
        if o["kind"] == kind and re.fullmatch(rf"{prefix}(-[a-z0-9]{{10}})?", o["metadata"]["name"])
    ]
    assert len(found) == 1, f"{kind}/{prefix}: {len(found)} found"
    return found[0]


def _container(deployment: Obj) -> Obj:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _ports(container: Obj) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


@dataclass(frozen=True)
class Pod:
    """One container as it would start: its settings and parsed command line."""

    deployment: Obj
    container: Obj
    settings: Settings
    args: Any
    argv: list[str]
    """The container's args with mount paths mapped to the local layout."""
    env: dict[str, str]
    workdir: Path


def _pod(objects: list[Obj], deployment_name: str, scratch: Path) -> Pod:
    """Lay the container's mounts out under ``scratch`` and load its settings there."""
    deployment = _one(objects, "Deployment", deployment_name)
    spec = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts", []):
        local = scratch / mount["mountPath"].lstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        mounts[mount["mountPath"]] = local
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            data = _one(objects, "ConfigMap", volume["configMap"]["name"])["data"]
            for key, text in data.items():
                (local / key).write_text(text)
        elif "secret" in volume:
            name = volume["secret"]["secretName"]
            keys = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == name]
            for key in keys[0].get("data", {}) if keys else EXTERNAL_SECRETS[name]:
                (local / key).write_text("placeholder\n")

    def local_path(value: str) -> str:
        for path, local in sorted(mounts.items(), key=lambda item: -len(item[0])):
            if value == path or value.startswith(path + "/"):
                return str(local) + value[len(path) :]
        return value

    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = local_path(item["value"])
        else:  # a secret's value: present (placeholder) unless optional
            env[item["name"]] = "placeholder"
    args = build_parser().parse_args(container["args"])
    config = Path(local_path(str(args.config)))
    workdir = Path(local_path(container["workingDir"]))
    with pytest.MonkeyPatch.context() as patch:  # relative paths resolve in workingDir
        patch.chdir(workdir)
        settings = load_settings(config, env, args.overrides)
        definitions = settings.features.definitions_path
        assert definitions is not None and (workdir / definitions).is_file()
        settings = settings.model_copy(
            update={
                "features": settings.features.model_copy(
                    update={"definitions_path": (workdir / definitions).resolve()}
                )
            }
        )
    argv = [local_path(arg) for arg in container["args"]]
    return Pod(deployment, container, settings, args, argv, env, workdir)


@pytest.fixture(scope="module")
def pods(
    rendered: dict[str, list[Obj]], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Pod]:
    """(overlay, deployment) -> the pod as it would start."""
    return {
        (overlay, name): _pod(objects, name, tmp_path_factory.mktemp(f"{overlay}-{name}"))
        for overlay, objects in rendered.items()
        for name in ("streamscore-server", "streamscore-worker")
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objects = rendered[overlay]
    kinds = {o["kind"] for o in objects}
    assert {
        "Namespace", "ServiceAccount", "ConfigMap", "Service", "PersistentVolumeClaim",
        "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
        "ScaledObject", "ServiceMonitor",
    } <= kinds  # fmt: skip
    for obj in objects:
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        schema = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if schema is not None:
            error = jsonschema.exceptions.best_match(
                jsonschema.Draft202012Validator(schema).iter_errors(obj)
            )
            assert error is None, f"{where}: {list(error.path)}: {error.message}"
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                caught = exc.caught
                pytest.fail(f"{where} (k8s {version}): {list(caught.path)}: {caught.message}")


def test_an_unknown_field_fails_validation() -> None:
    """The validators above do reject mistakes (strict built-ins, closed CRD schemas)."""
    objects = _render(K8S / "overlays" / "dev")
    deployment = _one(objects, "Deployment", "streamscore-server")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    scaled = _one(objects, "ScaledObject", "streamscore-worker")
    scaled["spec"]["triggers"][0]["metadata"]["consumerGroupp"] = "x"
    assert not jsonschema.Draft202012Validator(
        CRD_SCHEMAS["keda.sh/v1alpha1", "ScaledObject"]
    ).is_valid(scaled)


def test_config_copies_match_the_repository() -> None:
    """kustomize reads no file above its root: the base holds copies (`make k8s-config`)."""
    for copy, source in (
        ("streamscore.yaml", ROOT / "config" / "streamscore.yaml"),
        ("features.yaml", ROOT / "features.yaml"),
    ):
        assert (K8S / "base" / "config" / copy).read_bytes() == source.read_bytes(), (
            f"deploy/k8s/base/config/{copy} is stale: run `make k8s-config`"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_ports_probes_and_drain_follow_its_settings(
    rendered: dict[str, list[Obj]], pods: dict[tuple[str, str], Pod], overlay: str
) -> None:
    objects = rendered[overlay]
    pod = pods[overlay, "streamscore-server"]
    server, container = pod.settings.server, pod.container
    assert pod.args.command == "serve"
    assert server.host == "0.0.0.0"  # reachable from outside the pod
    assert server.processes == 1, "one process per pod: metrics_port + i would be unscraped"
    ports = _ports(container)
    assert ports["grpc"] == server.port
    assert ports["metrics"] == server.metrics_port
    if server.admin_port is not None:
        assert ports["admin"] == server.admin_port
        assert server.admin_tls is not None, "a separate admin port in a cluster is mTLS"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # Kubernetes' grpc probe: grpc.health.v1 Check of service "" on the scoring port.
        assert container[probe]["grpc"]["port"] == server.port, probe
        assert container[probe]["grpc"].get("service", "") == ""
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > server.grace_period_s

    spec = pod.deployment["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1]) + server.grace_period_s
    assert spec["terminationGracePeriodSeconds"] >= drain + 1, (
        f"SIGKILL would cut the drain: preStop {pre_stop[1]} s + grace_period_s "
        f"{server.grace_period_s} s vs terminationGracePeriodSeconds "
        f"{spec['terminationGracePeriodSeconds']}"
    )

    headless = _one(objects, "Service", "streamscore-server-headless")["spec"]
    normal = _one(objects, "Service", "streamscore-server")["spec"]
    assert headless["clusterIP"] == "None"
    assert normal.get("clusterIP") != "None"
    spec_labels = pod.deployment["spec"]["template"]["metadata"]["labels"]
    for service in (headless, normal):
        assert service["selector"].items() <= spec_labels.items()
        for port in service["ports"]:
            assert port["targetPort"] in ports, port
    grpc_ports = {p["port"] for p in normal["ports"] if p["name"] == "grpc"}
    assert grpc_ports == {server.port}


def _worker_default(name: str) -> Any:
    (field,) = (f for f in dataclasses.fields(WorkerConfig) if f.name == name)
    return field.default


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_and_keda_follow_the_worker_settings(
    rendered: dict[str, list[Obj]], pods: dict[tuple[str, str], Pod], overlay: str
) -> None:
    objects = rendered[overlay]
    pod = pods[overlay, "streamscore-worker"]
    assert pod.args.command == "stream"
    assert pod.args.metrics_host == "0.0.0.0"
    assert _ports(pod.container)["metrics"] == pod.args.metrics_port

    scaled = _one(objects, "ScaledObject", "streamscore-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == pod.deployment["metadata"]["name"]
    kafka = pod.settings.kafka
    assert pod.settings.features.definitions_path is not None
    topics = {
        group.topic
        for group in load_definitions(pod.settings.features.definitions_path).stream_groups.values()
    }
    triggers = scaled["spec"]["triggers"]
    assert {t["metadata"]["topic"] for t in triggers} == topics  # what the worker consumes
    for trigger in triggers:
        meta = trigger["metadata"]
        assert meta["consumerGroup"] == kafka.group_id
        assert meta["bootstrapServers"] == kafka.bootstrap_servers
        assert meta["offsetResetPolicy"] == _worker_default("auto_offset_reset")
        assert meta["allowIdleConsumers"] == "false"
    partitions = int(scaled["metadata"]["annotations"]["streamscore.io/topic-partitions"])
    assert scaled["spec"]["maxReplicaCount"] == partitions
    if overlay == "dev":  # the topic `streamscore dev` creates
        assert partitions == DevOptions.partitions


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_the_image_user_without_privileges(
    pods: dict[tuple[str, str], Pod], overlay: str
) -> None:
    uid = int(re.findall(r"--uid (\d+)", (ROOT / "Dockerfile").read_text())[0])
    for name in ("streamscore-server", "streamscore-worker"):
        pod = pods[overlay, name]
        spec = pod.deployment["spec"]["template"]["spec"]
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == uid
        assert security["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        own = pod.container["securityContext"]
        assert own["allowPrivilegeEscalation"] is False
        assert own["readOnlyRootFilesystem"] is True
        assert own["capabilities"]["drop"] == ["ALL"]
        assert pod.container["resources"]["requests"]["memory"]
        assert pod.container["resources"]["limits"]["memory"]
        assert spec["topologySpreadConstraints"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_open_exactly_the_configured_ports(
    rendered: dict[str, list[Obj]], pods: dict[tuple[str, str], Pod], overlay: str
) -> None:
    objects = rendered[overlay]
    for name in ("streamscore-server", "streamscore-worker"):
        pod = pods[overlay, name]
        labels = pod.deployment["spec"]["template"]["metadata"]["labels"]
        policies = [
            o
            for o in objects
            if o["kind"] == "NetworkPolicy"
            and o["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        ]
        ingress = {
            p["port"]
            for pol in policies
            for r in pol["spec"].get("ingress", [])
            for p in r["ports"]
        }
        egress = {
            p["port"] for pol in policies for r in pol["spec"].get("egress", []) for p in r["ports"]
        }
        assert ingress == set(_ports(pod.container).values()), name
        redis_port = urlsplit(pod.settings.redis.url).port or 6379
        kafka_ports = {
            int(address.rsplit(":", 1)[1])
            for address in pod.settings.kafka.bootstrap_servers.split(",")
        }
        assert {53, redis_port, *kafka_ports} <= egress, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaling_and_disruption_objects_target_the_deployments(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objects = rendered[overlay]
    hpa = _one(objects, "HorizontalPodAutoscaler", "streamscore-server")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "streamscore-server",
    }
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    for name in ("streamscore-server", "streamscore-worker"):
        deployment = _one(objects, "Deployment", name)
        assert "replicas" not in deployment["spec"], "the autoscaler owns the count"
        pdb = _one(objects, "PodDisruptionBudget", name)["spec"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert pdb["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_is_generated_or_documented(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objects = rendered[overlay]
    present = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    readme = (K8S / "README.md").read_text()
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        spec = obj["spec"]["template"]["spec"]
        wanted = [v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v]
        for container in spec["containers"]:
            wanted += [
                e["valueFrom"]["secretKeyRef"]["name"]
                for e in container.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            ]
        for name in wanted:
            if overlay == "dev":
                assert name in present, f"dev references a Secret it does not generate: {name}"
            elif name not in present:
                assert name in EXTERNAL_SECRETS and f"`{name}`" in readme, name
    for secret in (o for o in objects if o["kind"] == "Secret"):
        assert overlay == "dev", "prod must not carry secret values"
        assert secret["metadata"]["name"].startswith("streamscore-admin-token")


def _metric_rule() -> dict[str, Any]:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return dict(rule)


def _scrape(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return str(response.read().decode())


async def test_hpa_and_scrape_config_use_what_the_server_serves(
    rendered: dict[str, list[Obj]], linear_repository: Path
) -> None:
    objects = rendered["prod"]
    (metric,) = _one(objects, "HorizontalPodAutoscaler", "streamscore-server")["spec"]["metrics"]
    hpa_name = metric["pods"]["metric"]["name"]
    rule = _metric_rule()
    series = re.fullmatch(r"(\w+)\{.*\}", rule["seriesQuery"])
    assert series is not None
    assert re.fullmatch(rule["name"]["matches"], series.group(1))
    assert rule["name"]["as"] == hpa_name  # the adapter publishes what the HPA asks for
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    (endpoint,) = _one(objects, "ServiceMonitor", "streamscore")["spec"]["endpoints"]

    metrics_port = free_port()
    async with running_server(linear_repository, [f"server.metrics_port={metrics_port}"]) as srv:
        health = health_pb2_grpc.HealthStub(srv.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING  # the probes' check
        await srv.scoring.Score(
            pb.ScoreRequest(model="lin", features={f: 0.5 for f in TEST_FEATURES}), timeout=5
        )
        text = await asyncio.to_thread(_scrape, srv.app.metrics_port, endpoint["path"])
    families = {family.name: family for family in text_string_to_metric_families(text)}
    served = families.get(series.group(1))
    assert served is not None, f"{series.group(1)} is not served; served: {sorted(families)}"
    assert served.type == "gauge"  # summed per pod, averaged by the HPA
    assert served.samples, "the in-flight gauge has no series"


def test_service_monitor_scrapes_the_metrics_ports(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["prod"]
    monitor = _one(objects, "ServiceMonitor", "streamscore")["spec"]
    selector = monitor["selector"]["matchLabels"]
    scraped = [
        o
        for o in objects
        if o["kind"] == "Service" and selector.items() <= o["metadata"]["labels"].items()
    ]
    assert {s["metadata"]["name"] for s in scraped} == {
        "streamscore-server",
        "streamscore-worker-metrics",
    }
    (endpoint,) = monitor["endpoints"]
    for service in scraped:
        names = {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["port"] in names, service["metadata"]["name"]


def _listening_on_any_address(port: int) -> bool:
    """Whether a TCP socket listens on 0.0.0.0:``port`` (reachable from other pods)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and local == f"00000000:{port:04X}":
            return True
    return False


def _await_scrape(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, f"the worker exited with {process.returncode}"
        try:
            return _scrape(port, "/metrics")
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_the_worker_starts_from_its_container_args_and_is_scrapable(
    pods: dict[tuple[str, str], Pod], redis_url: str, kafka: KafkaBroker
) -> None:
    """The rendered worker command, config files and env start a real worker against a
    real Redis and broker, and its /metrics listens on every address of the pod."""
    pod = pods["prod", "streamscore-worker"]
    port = free_port()
    argv = list(pod.argv)
    argv[argv.index("--metrics-port") + 1] = str(port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSCORE_")}
    env.update(pod.env)
    # the package from this checkout, whatever the working directory (the pod's)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["STREAMSCORE_REDIS__URL"] = redis_url
    env["STREAMSCORE_KAFKA__BOOTSTRAP_SERVERS"] = kafka.bootstrap_servers
    env["STREAMSCORE_KAFKA__GROUP_ID"] = f"k8s-manifests-{uuid.uuid4().hex}"  # shared broker
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())", *argv],
        cwd=pod.workdir,
        env=env,
    )
    try:
        text = _await_scrape(port, process, timeout_s=60)
        assert _listening_on_any_address(port)
        names = {family.name for family in text_string_to_metric_families(text)}
        assert "streamscore_stream_events" in names, sorted(names)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
