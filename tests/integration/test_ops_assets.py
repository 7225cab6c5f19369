"""The operations assets under config/: Prometheus rules and config, Grafana dashboard, Kubernetes.

promtool checks the rules and config and runs the rules' unit tests (config/prometheus/alerts_test.yml);
the Kubernetes manifests are validated offline against the API schemas shipped by the
`kubernetes-validate` package; the ConfigMap's TOML must be a config `shadowproxy` accepts, and the
pod's grace period must outlast the drain it configures. test_prometheus_scrape.py runs the
queries against a real Prometheus scraping a real proxy.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics_core import Metric

from shadowproxy.config import Config, parse_config
from shadowproxy.shadow.metrics import JudgeMetrics, Metrics
from tests.helpers import DASHBOARD, PROMETHEUS_DIR, ROOT, dashboard_panels, require_binary

KUBERNETES_DIR = ROOT / "config" / "kubernetes"
MANIFESTS = ("configmap.yaml", "deployment.yaml", "service.yaml", "networkpolicy.yaml")
# The newest Kubernetes release whose schemas the installed kubernetes-validate ships.
KUBERNETES_VERSION = kubernetes_validate.latest_version()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as file:
        return [doc for doc in yaml.safe_load_all(file) if doc is not None]


def alert_rules() -> list[dict[str, Any]]:
    with (PROMETHEUS_DIR / "alerts.yml").open() as file:
        groups = yaml.safe_load(file)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def exported_series_names() -> set[str]:
    """Every series name the proxy's /metrics can show (histograms as _bucket, _count, _sum)."""
    names: set[str] = set()
    metric: Metric
    metrics = Metrics()
    JudgeMetrics(metrics.registry)  # registered with a [judge] table only
    for metric in metrics.registry.collect():
        names.update(sample.name for sample in metric.samples)
    return names


def configmap_config() -> tuple[dict[str, Any], Config]:
    """The ConfigMap's TOML, and the config it makes with its `file:` token read from a stand-in
    (the Secret exists only in the pod)."""
    (configmap,) = load_yaml_documents(KUBERNETES_DIR / "configmap.yaml")
    data = tomllib.loads(configmap["data"]["shadowproxy.toml"])
    return data, parse_config({**data, "admin": {**data["admin"], "token": "stand-in"}})


def deployment() -> dict[str, Any]:
    (doc,) = load_yaml_documents(KUBERNETES_DIR / "deployment.yaml")
    return doc


# --- Prometheus ------------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    promtool = require_binary("promtool")
    result = run(promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rule_unit_tests_pass() -> None:
    promtool = require_binary("promtool")
    result = run(promtool, "test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_passes_promtool_check() -> None:
    promtool = require_binary("promtool")
    result = run(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_scrapes_the_admin_metrics_every_15s_and_loads_the_alerts() -> None:
    (config,) = load_yaml_documents(PROMETHEUS_DIR / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "shadowproxy"]
    assert job["metrics_path"] == "/metrics"
    assert job["scrape_interval"] == "15s"


def test_every_alert_has_a_severity_summary_description_and_runbook() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == {
        "ShadowproxyCandidateDisagreementHigh",
        "ShadowproxyCandidateLatencyRegression",
        "ShadowproxyMirrorDropping",
        "ShadowproxyProduction5xxHigh",
        "ShadowproxyDown",
        "ShadowproxyFeatureDrift",
        "ShadowproxyCandidateTimeToFirstTokenRegression",
        "ShadowproxyJudgeErrorsHigh",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        assert rule.get("for"), f"{rule['alert']} fires on a single evaluation"


def test_every_alert_has_unit_tests_where_it_fires_and_where_it_does_not() -> None:
    with (PROMETHEUS_DIR / "alerts_test.yml").open() as file:
        tests = yaml.safe_load(file)["tests"]
    fires: dict[str, bool] = {}
    quiet: dict[str, bool] = {}
    for test in tests:
        for case in test.get("alert_rule_test", []):
            name = case["alertname"]
            if case.get("exp_alerts"):
                fires[name] = True
            else:
                quiet[name] = True
    for rule in alert_rules():
        assert fires.get(rule["alert"]), f"no unit test where {rule['alert']} fires"
        assert quiet.get(rule["alert"]), f"no unit test where {rule['alert']} stays quiet"


def test_alerts_and_dashboard_use_only_metrics_the_proxy_exports() -> None:
    """A renamed metric must break this test, not silently blank a panel or an alert."""
    exported = exported_series_names()
    queries = [rule["expr"] for rule in alert_rules()]
    queries += [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]
    used = {name for query in queries for name in re.findall(r"\bshadowproxy_[a-z0-9_]+", query)}
    assert used, "no shadowproxy metric found in any query"
    assert used <= exported, f"not exported by shadowproxy.shadow.metrics: {sorted(used - exported)}"


# --- Grafana ---------------------------------------------------------------------------------------


def test_dashboard_parses_and_every_panel_has_a_prometheus_query() -> None:
    with DASHBOARD.open() as file:
        dashboard = json.load(file)
    assert dashboard["schemaVersion"] >= 36
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels()
    assert panels
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"]["type"] == "prometheus", title
        assert panel["targets"], f"panel {title!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {title!r} has an empty query"
            assert target["datasource"]["type"] == "prometheus", title
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_dashboard_covers_latency_disagreement_mirror_requests_in_flight_and_outcomes() -> None:
    exprs = " ".join(target["expr"] for panel in dashboard_panels() for target in panel["targets"])
    assert "histogram_quantile(0.5, sum by (le, target)" in exprs
    assert "histogram_quantile(0.99, sum by (le, target)" in exprs
    assert 'outcome="disagree"' in exprs
    # Per candidate: `target` names each (several may be mirrored at once).
    assert "sum by (target, result) (rate(shadowproxy_mirror_requests_total" in exprs
    assert "sum by (target) (rate(shadowproxy_comparisons_total" in exprs
    assert "sum by (status_class) (rate(shadowproxy_requests_total" in exprs
    assert "shadowproxy_mirror_in_flight" in exprs
    assert "sum by (target, outcome) (rate(shadowproxy_comparisons_total" in exprs


# --- Kubernetes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MANIFESTS)
def test_kubernetes_manifest_validates_against_the_api_schema(name: str) -> None:
    documents = load_yaml_documents(KUBERNETES_DIR / name)
    assert documents
    for document in documents:
        # strict: unknown fields (typos such as `readinesProbe`) are errors, not ignored.
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_configmap_toml_is_a_config_shadowproxy_accepts() -> None:
    _, config = configmap_config()
    assert config.production.url == "http://model-production.ml.svc.cluster.local:8080"
    assert config.candidate.url == "http://model-candidate.ml.svc.cluster.local:8080"


def test_grace_period_outlasts_shutdown_delay_plus_drain() -> None:
    _, config = configmap_config()
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert config.listen.shutdown_delay_s > 0, "no delay: the pod stops accepting before endpoints update"
    assert grace > config.listen.shutdown_delay_s + config.listen.drain_timeout_s


def test_deployment_serves_the_mounted_config_on_its_ports_with_probes_on_admin() -> None:
    _, config = configmap_config()
    pod = deployment()["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "shadowproxy:latest"
    command = container.get("command", []) + container.get("args", [])
    assert command[:3] == ["shadowproxy", "serve", "--config"]
    config_path = Path(command[3])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "shadowproxy-config"
    assert {"key": "shadowproxy.toml", "path": config_path.name} in volume["configMap"]["items"]

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.listen.port, "admin": config.admin.port}
    # Probes and scrapes come from outside the pod's loopback.
    assert config.admin.host not in ("127.0.0.1", "localhost", "::1")
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["resources"]["requests"] and container["resources"]["limits"]

    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0


def test_service_selects_the_pods_and_names_the_admin_port_for_scraping() -> None:
    (service,) = load_yaml_documents(KUBERNETES_DIR / "service.yaml")
    pod_labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["admin"]["targetPort"] == "admin"
    assert ports["http"]["targetPort"] == "http"
    # The commented kubernetes_sd job in prometheus.yml keeps endpoints by these names.
    prometheus_yml = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    assert "__meta_kubernetes_endpoint_port_name]\n  #       regex: admin" in prometheus_yml
    assert service["metadata"]["labels"]["app.kubernetes.io/name"] == "shadowproxy"


def test_admin_token_is_read_from_the_mounted_secret() -> None:
    data, _ = configmap_config()
    source = data["admin"]["token"]
    assert source.startswith("file:")
    path = Path(source.removeprefix("file:"))
    pod = deployment()["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # A subPath mount never sees an updated Secret, so a rotated token would not arrive.
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    assert "subPath" not in mount
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert {item["path"] for item in volume["secret"]["items"]} == {path.name}


def test_network_policy_admits_the_admin_port_only_from_the_monitoring_namespace() -> None:
    (policy,) = load_yaml_documents(KUBERNETES_DIR / "networkpolicy.yaml")
    pod = deployment()["spec"]["template"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (container,) = pod["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    admitted: dict[str, list[Any]] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("ports"), "a rule without ports admits every port, the admin port too"
        for port in rule["ports"]:
            assert port["port"] in port_names
            admitted.setdefault(port["port"], []).append(rule.get("from"))
    assert admitted["http"] == [None]  # clients from anywhere
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert admitted["admin"] == [[monitoring]]
