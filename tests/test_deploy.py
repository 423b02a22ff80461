"""Deployment artefacts: Dockerfile, Compose stack (Prometheus, Grafana), Kubernetes manifests.

What runs here without a Docker daemon or a cluster:
- promtool (Debian `prometheus`): every Prometheus config, the alert rules and their unit tests, and
  every PromQL expression of the Grafana dashboard (as recording rules, so promtool parses them);
- a live small-model server (`python -m server.cli serve`): every `kvsplice:*` metric that the
  dashboard, the alerts, the prometheus-adapter rule and the HPA query must be on its /metrics;
- kustomize (`kustomize build`, or the one built into `kubectl kustomize`): both overlays build and
  every object validates against the Kubernetes OpenAPI schemas (kubernetes-validate, strict);
  the ServiceMonitor CRD has no schema there and gets structural checks instead;
- compose-spec (the Rust compose_spec parser, strict) on compose.yaml after `${VAR:-default}`
  interpolation, plus the references between the files it mounts;
- hadolint on the Dockerfile, and every file it COPYs exists and is not cut by .dockerignore;
- server.settings on every server config the deployments ship (ConfigMaps, compose environment).

scripts/ci-install-deploy-tools.sh installs the tools. A missing tool skips its test on a
developer machine and fails it under CI (CI set), so that CI cannot pass by skipping.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "kvsplice.json"
ALERT_RULES = sorted((COMPOSE_DIR / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((COMPOSE_DIR / "prometheus" / "tests").glob("*.test.yml"))
ADAPTER_RULES = K8S / "prometheus-adapter-rules.yaml"
OVERLAYS = {"deepseek-v2-lite-1gpu": 1, "deepseek-v2-8gpu": 8}  # overlay -> GPUs per replica
# Kubernetes versions to validate against: an older one still in wide use and the newest known.
K8S_VERSIONS = ["1.29.0", None]  # None: kubernetes-validate's latest
METRIC_RE = re.compile(r"kvsplice:[A-Za-z0-9_:]*[A-Za-z0-9_]")
SERVER_START_TIMEOUT_S = 180  # model load on a busy 2-core CI machine, as in conftest


# ----------------------------------------------------------------------------- helpers


def _missing_tool(what: str) -> None:
    message = f"{what} is not installed; run scripts/ci-install-deploy-tools.sh"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _tool(name: str) -> str:
    """A command from PATH or from the interpreter's own bin dir (the project venv)."""
    local = Path(sys.executable).parent / name
    found = shutil.which(name) or (str(local) if local.exists() else None)
    if found is None:
        _missing_tool(name)
    return found


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


def _load_yaml_docs(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _walk_strings(node, keys: set[str]):
    """Yield every string stored under one of `keys` anywhere in a JSON-like tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                yield value
            else:
                yield from _walk_strings(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_strings(item, keys)


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _all_panels(_dashboard()) for t in p.get("targets", [])]


def _all_panels(dash: dict) -> list[dict]:
    panels = []
    for panel in dash["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return panels


def _grafana_to_promql(expr: str) -> str:
    """Replace Grafana's template variables by values Prometheus accepts."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "1h")
    return re.sub(r"\$\{?(model_name|instance)\}?", ".*", expr)


def _alert_exprs() -> list[str]:
    exprs = []
    for path in ALERT_RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            exprs += [rule["expr"] for rule in group["rules"]]
    return exprs


def _adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]


def _adapter_name(rule: dict, series: str) -> str:
    """The custom-metrics API name prometheus-adapter gives `series` under `rule` (name.matches/as)."""
    name = rule.get("name", {})
    pattern = name.get("matches", "")
    match = re.search(pattern, series)
    assert match, f"adapter rule {pattern!r} does not match {series}"
    # The adapter's `as` uses Go's ${1} syntax; Python's re wants \g<1>.
    template = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", name.get("as", "") or r"\g<0>")
    return match.expand(template)


def _hpa_custom_metric_names(objects: list[dict]) -> list[str]:
    names = []
    for obj in objects:
        if obj["kind"] == "HorizontalPodAutoscaler":
            for metric in obj["spec"].get("metrics", []):
                if metric["type"] == "Pods":
                    names.append(metric["pods"]["metric"]["name"])
    return names


def _base_hpa() -> list[dict]:
    return _load_yaml_docs((K8S / "base" / "hpa.yaml").read_text())


def _queried_metric_names() -> dict[str, set[str]]:
    """Every kvsplice:* series name that something deployed reads, by who reads it."""
    readers: dict[str, set[str]] = {}

    def add(name: str, reader: str) -> None:
        readers.setdefault(name, set()).add(reader)

    for text in _walk_strings(_dashboard(), {"expr", "query", "definition"}):
        for name in METRIC_RE.findall(text):
            add(name, "grafana dashboard")
    for expr in _alert_exprs():
        for name in METRIC_RE.findall(expr):
            add(name, "alert rules")
    adapter_series = {}
    for rule in _adapter_rules():
        for name in METRIC_RE.findall(rule["seriesQuery"]):
            add(name, "prometheus-adapter rule")
            adapter_series[_adapter_name(rule, name)] = name
    for hpa_name in _hpa_custom_metric_names(_base_hpa()):
        assert hpa_name in adapter_series, (
            f"the HPA asks the custom metrics API for {hpa_name}, but no prometheus-adapter rule in "
            f"{ADAPTER_RULES.relative_to(REPO)} serves that name (it serves {sorted(adapter_series)})")
        add(adapter_series[hpa_name], "HorizontalPodAutoscaler")
    return readers


def _kvsplice_settings():
    if importlib.util.find_spec("server.settings") is None:
        pytest.skip("server.settings does not exist yet")
    from server import settings

    return settings


def _check_server_config(values_source: str, **load_kwargs):
    """The server's own settings class accepts a deployed config (names and values); returns it."""
    settings = _kvsplice_settings()
    try:
        return settings.load_settings(**load_kwargs)
    except settings.InvalidSettings as exc:
        pytest.fail(f"{values_source}: the server rejects this configuration: {exc}")


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("KVSPLICE_")]:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ----------------------------------------------------------------------------- Prometheus


def _prometheus_configs() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("prometheus*.yml") if "rules" not in p.parts and "tests" not in p.parts)


def test_prometheus_configs_found():
    assert [p.relative_to(REPO).as_posix() for p in _prometheus_configs()] == [
        "deploy/compose/prometheus/prometheus.yml"]
    assert ALERT_RULES and RULE_TESTS


@pytest.mark.parametrize("config", _prometheus_configs(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_promtool_check_config(config: Path):
    # Also checks the rule files the config names (rules/*.yml, relative to the config file).
    result = _run([_tool("promtool"), "check", "config", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rule files found" in result.stdout + result.stderr, "the config should load the alert rules"


@pytest.mark.parametrize("rules", ALERT_RULES, ids=lambda p: p.name)
def test_promtool_check_rules(rules: Path):
    result = _run([_tool("promtool"), "check", "rules", str(rules)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("tests", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_rule_unit_tests(tests: Path):
    result = _run([_tool("promtool"), "test", "rules", tests.name], cwd=tests.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_promql_parses(tmp_path: Path):
    """promtool parses each dashboard query, turned into a recording rule (Grafana variables filled in)."""
    rules = [{"record": f"kvsplice_dashboard:query_{i}", "expr": _grafana_to_promql(expr)}
             for i, expr in enumerate(_dashboard_exprs())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([_tool("promtool"), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# ----------------------------------------------------------------------------- Grafana


def test_dashboard_covers_the_required_panels():
    exprs = _dashboard_exprs()
    joined = "\n".join(exprs)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert has(r"rate\(kvsplice:generation_tokens_total\{"), "output tokens/s panel"
    for metric in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        for q in ("0.5", "0.9", "0.99"):
            assert has(rf"histogram_quantile\({q}, .*kvsplice:{metric}_bucket\{{"), f"{metric} p{q}"
    for metric in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                   "kv_cache_capacity_tokens", "kv_cache_bytes_per_token", "kv_cache_compression_ratio",
                   "num_preemptions_total"):
        assert f"kvsplice:{metric}" in joined, metric
    # A/B: every query keeps the instance apart, and the instance/model filters apply everywhere.
    for expr in exprs:
        assert re.search(r"by \([^)]*instance", expr), f"not split by instance: {expr}"
        assert 'model_name=~"$model_name"' in expr and 'instance=~"$instance"' in expr, expr


def test_dashboard_is_well_formed():
    dash = _dashboard()
    panels = _all_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"], panel["title"]


def test_grafana_provisioning_matches_compose():
    compose = _compose_model()
    grafana = compose["services"]["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"] if m.startswith("./")}
    datasources = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    host = re.match(r"https?://([^:/]+)", source["url"]).group(1)
    assert host in compose["services"], f"datasource points at {host}, not a compose service"
    providers = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/kvsplice.yaml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert path in mounts and (COMPOSE_DIR / mounts[path] / DASHBOARD.name).exists(), path
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/{DASHBOARD.name}"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"


# ----------------------------------------------------------------------------- Compose

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}` / `${VAR:-default}` substitution, with an empty environment by default."""
    assert "$$" not in text, "escaped dollars are not handled here"
    return _INTERPOLATION.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def _compose_text(env: dict[str, str] | None = None) -> str:
    return _interpolate((COMPOSE_DIR / "compose.yaml").read_text(), env or {})


def _compose_model() -> dict:
    """compose.yaml as Compose sees it: interpolated, YAML merge keys applied, x- keys kept."""
    return yaml.safe_load(_compose_text())


def test_compose_file_is_valid_compose_spec():
    try:
        from compose_spec import PyOptions
    except ImportError:
        _missing_tool("compose-spec (PyPI)")
    for env in ({}, {"KVSPLICE_GPU": "2", "KVSPLICE_AB_GPU": "3", "KVSPLICE_PUBLISH_PORT": "18000"}):
        try:
            parsed = PyOptions(apply_merge=True).from_yaml(_compose_text(env))
        except ValueError as exc:
            pytest.fail(f"compose.yaml is not valid Compose: {exc}")
        parsed.validate()
        assert set(parsed.service_names()) == {"kvsplice", "kvsplice-ab", "prometheus", "grafana"}


def test_compose_servers_gpu_profiles_and_mounts():
    compose = _compose_model()
    services = compose["services"]
    main, ab = services["kvsplice"], services["kvsplice-ab"]
    for server, gpu in ((main, "0"), (ab, "1")):
        (device,) = server["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["device_ids"] == [gpu]
        assert server["build"]["context"] == "../.." and (COMPOSE_DIR / "../.." / server["build"]["dockerfile"]).exists()
        assert "hf-cache:/cache/huggingface" in server["volumes"]
        assert server["healthcheck"]["test"] == ["CMD", "kvsplice-healthcheck"]
    assert "profiles" not in main and ab["profiles"] == ["ab"]
    assert str(main["environment"]["KVSPLICE_COMPRESSION_RATIO"]) == "0.5"
    assert str(ab["environment"]["KVSPLICE_COMPRESSION_RATIO"]) == "1.0"
    # A/B is only fair with one KV budget in bytes for both.
    assert main["environment"]["KVSPLICE_KV_CACHE_BYTES"] == ab["environment"]["KVSPLICE_KV_CACHE_BYTES"]
    # Named volumes are declared; bind-mounted files and folders exist.
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"
    # Prometheus scrapes exactly the two server services, on the port they listen on.
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus/prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "kvsplice"]
    (sd,) = job["dns_sd_configs"]
    assert set(sd["names"]) == {"kvsplice", "kvsplice-ab"}
    assert all(s["ports"][0].endswith(f":{sd['port']}") for s in (main, ab))


def test_compose_server_environment_is_accepted_by_the_server():
    compose = _compose_model()
    for name in ("kvsplice", "kvsplice-ab"):
        env = {k: str(v) for k, v in compose["services"][name]["environment"].items() if k.startswith("KVSPLICE_")}
        with _environ(env):
            _check_server_config(f"compose service {name}")


# ----------------------------------------------------------------------------- Kubernetes


def _kustomize(path: Path) -> list[dict]:
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(path)]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(path)]
    else:
        _missing_tool("kustomize (or kubectl, which has it built in)")
    result = _run(cmd)
    assert result.returncode == 0, f"{shlex.join(cmd)} failed:\n{result.stderr}"
    return _load_yaml_docs(result.stdout)


def _by_kind(objects: list[dict]) -> dict[str, dict]:
    kinds: dict[str, dict] = {}
    for obj in objects:
        assert obj["kind"] not in kinds, f"two {obj['kind']} objects; the checks below expect one"
        kinds[obj["kind"]] = obj
    return kinds


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def _check_service_monitor(monitor: dict, service: dict) -> None:
    """Structural checks for monitoring.coreos.com/v1 ServiceMonitor (no schema in kubernetes-validate)."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                         "podTargetLabels", "sampleLimit"}, set(spec)
    assert _selects(spec["selector"], service["metadata"]["labels"]), "ServiceMonitor does not select the Service"
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                                 "relabelings", "metricRelabelings"}, set(endpoint)
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        for key in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"\d+[smh]", endpoint[key]), endpoint[key]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_builds_and_validates_against_kubernetes_schemas(overlay: str):
    try:
        import kubernetes_validate
    except ImportError:
        _missing_tool("kubernetes-validate (PyPI)")
    objects = _kustomize(K8S / "overlays" / overlay)
    kinds = _by_kind(objects)
    assert set(kinds) == {"ConfigMap", "Service", "PersistentVolumeClaim", "Deployment", "ServiceMonitor",
                          "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    not_in_schemas = []
    for version in K8S_VERSIONS:
        version = version or kubernetes_validate.latest_version()
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                # CRDs are not in the Kubernetes OpenAPI schemas: ServiceMonitor gets the structural
                # checks of _check_service_monitor instead. Any other unknown kind is an error.
                not_in_schemas.append(obj["kind"])
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes "
                            f"{version} at {path}: {exc.message}")
    assert set(not_in_schemas) == {"ServiceMonitor"}, not_in_schemas
    _check_service_monitor(kinds["ServiceMonitor"], kinds["Service"])


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_objects_fit_together(overlay: str, tmp_path: Path):
    kinds = _by_kind(_kustomize(K8S / "overlays" / overlay))
    deployment, service = kinds["Deployment"], kinds["Service"]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"], pod_labels)
    assert all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert _selects(kinds["PodDisruptionBudget"]["spec"]["selector"], pod_labels)

    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in ports
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ports, probe
    gpus = OVERLAYS[overlay]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == gpus and resources["requests"]["nvidia.com/gpu"] == gpus
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_map = kinds["ConfigMap"]
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]  # the hashed name
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    assert mounts[str(config_path.parent)] == "config" and config_path.name in config_map["data"]
    pvc = kinds["PersistentVolumeClaim"]
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    env = {e["name"]: e for e in container["env"]}
    assert mounts[env["HF_HOME"]["value"]] == "model-cache"

    hpa = kinds["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    served = {_adapter_name(rule, name) for rule in _adapter_rules()
              for name in METRIC_RE.findall(rule["seriesQuery"])}
    assert set(_hpa_custom_metric_names([hpa])) <= served

    # The server accepts the shipped config file, and it asks for as many GPUs as the pod gets.
    config = yaml.safe_load(config_map["data"][config_path.name])
    assert config.get("tensor_parallel_size", 1) * config.get("pipeline_parallel_size", 1) == gpus
    assert config["host"] == "0.0.0.0" and config["port"] == ports[service["spec"]["ports"][0]["targetPort"]]
    assert "DeepSeek-V2" in config["model"]
    path = tmp_path / config_path.name
    path.write_text(config_map["data"][config_path.name])
    with _environ({}):
        loaded = _check_server_config(f"{overlay} ConfigMap", config=str(path))
    # Kubernetes kills the pod after the grace period: the server's drain must end before it.
    assert loaded.drain_timeout_s < pod["spec"]["terminationGracePeriodSeconds"]


def test_prometheus_adapter_rule_renames_for_the_hpa():
    (rule,) = _adapter_rules()
    assert "kvsplice:num_requests_waiting" in rule["seriesQuery"]
    assert _adapter_name(rule, "kvsplice:num_requests_waiting") == "kvsplice_num_requests_waiting"
    assert _hpa_custom_metric_names(_base_hpa()) == ["kvsplice_num_requests_waiting"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


# ----------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker too
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return instructions


def _copy_sources(args: str) -> list[str]:
    if args.startswith("["):
        parts = json.loads(args)
    else:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
    assert len(parts) >= 2, args
    return parts[:-1]


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip().lstrip("/").removeprefix("./").rstrip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negate, re.compile(regex + r"\Z")))
    return patterns


def _ignored(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    ignored = False
    for negate, regex in patterns:
        if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerfile_copies_existing_files_not_cut_by_dockerignore():
    patterns = _dockerignore_patterns()
    copies = [args for keyword, args in _dockerfile_instructions() if keyword in ("COPY", "ADD")]
    assert copies
    copied_top = set()
    for args in copies:
        if args.startswith("--from="):
            assert args.startswith("--from=build "), "only the build stage is copied from"
            continue
        matched = []
        for source in _copy_sources(args):
            if any(ch in source for ch in "*?["):
                hits = [p.relative_to(REPO).as_posix() for p in REPO.glob(source)]
            else:
                assert (REPO / source).exists(), f"COPY source {source} does not exist"
                hits = [source]
            hits = [h for h in hits if not _ignored(h, patterns)]
            if not any(ch in source for ch in "*?["):
                assert hits, f"COPY source {source} is excluded by .dockerignore"
            matched += hits
            copied_top.add(source.split("/")[0])
        # Docker fails a COPY only when none of its sources match anything.
        assert matched, f"COPY {args}: no source matches"
    # Every package pyproject installs is in the build context.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for include in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = include.rstrip("*")
        assert package in copied_top, f"package {package} is not copied into the image"
    # Files a build must never carry.
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "server/__pycache__/x.pyc"):
        assert _ignored(path, patterns), f".dockerignore should exclude {path}"


def test_dockerfile_shape():
    instructions = _dockerfile_instructions()
    by_keyword: dict[str, list[str]] = {}
    for keyword, args in instructions:
        by_keyword.setdefault(keyword, []).append(args)
    assert any(a.startswith("BASE_IMAGE=nvidia/cuda:") and "runtime" in a for a in by_keyword["ARG"]), "CUDA runtime base"
    assert by_keyword["FROM"] == ["${BASE_IMAGE} AS build", "${BASE_IMAGE}"], "two stages on one base"
    assert by_keyword["ENTRYPOINT"] == ['["kvsplice", "serve"]']
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["kvsplice"] == "server.cli:main"
    env = " ".join(by_keyword["ENV"])
    assert "KVSPLICE_HOST=0.0.0.0" in env
    hf_home = re.search(r"HF_HOME=(\S+)", env).group(1)
    assert by_keyword["VOLUME"] == [f'["{hf_home}"]']
    (user,) = by_keyword["USER"]
    assert user.split(":")[0] not in ("0", "root")
    (health,) = by_keyword["HEALTHCHECK"]
    assert '"kvsplice-healthcheck"' in health
    assert any("deploy/docker/healthcheck.py /usr/local/bin/kvsplice-healthcheck" in a for a in by_keyword["COPY"])
    assert "PROJECT_EXTRAS=gpu" in by_keyword["ARG"] and any("pip install" in a and "PROJECT_EXTRAS" in a
                                                          for a in by_keyword["RUN"])
    assert any("COPY" == k and a.startswith("--from=build /opt/venv") for k, a in instructions)


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    result = _run([hadolint, "--no-color", "--failure-threshold", "info", str(REPO / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- live server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    """The real server with its small built-in model, on a free loopback port."""
    if importlib.util.find_spec("server.cli") is None:
        pytest.skip("server/cli.py does not exist yet")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSPLICE_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def log_tail() -> str:
        return log_path.read_text()[-4000:]

    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode} before /health answered:\n{log_tail()}")
            with contextlib.suppress(OSError):
                if _http("GET", f"{base}/health", timeout=2)[0] == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"/health not 200 after {SERVER_START_TIMEOUT_S}s:\n{log_tail()}")
            time.sleep(0.5)
        yield base, port, log_tail
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def exported(live_server):
    """Sample names on /metrics after one finished request, and the families by name and type."""
    from prometheus_client.parser import text_string_to_metric_families

    base, _, log_tail = live_server
    status, body = _http("GET", f"{base}/v1/models")
    assert status == 200, body
    model = json.loads(body)["data"][0]["id"]
    status, body = _http("POST", f"{base}/v1/completions",
                         {"model": model, "prompt": "The cache", "max_tokens": 4, "temperature": 0})
    assert status == 200, f"{status} {body[:500]!r}\n{log_tail()}"
    status, body = _http("GET", f"{base}/metrics")
    assert status == 200
    families = list(text_string_to_metric_families(body.decode()))
    return families


def _exportable_names(families) -> set[str]:
    """Series names a family of this type can have, plus every sample name actually present."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""],
                "summary": ["", "_sum", "_count"], "unknown": [""]}
    names = set()
    for family in families:
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
        names.update(sample.name for sample in family.samples)
    return names


def test_every_queried_metric_is_exported_by_the_live_server(exported):
    names = _exportable_names(exported)
    readers = _queried_metric_names()
    assert len(readers) >= 15, sorted(readers)
    missing = {name: sorted(who) for name, who in readers.items() if name not in names}
    assert not missing, (f"queried but not exported by the server: {missing}; kvsplice series on "
                         f"/metrics: {sorted(n for n in names if n.startswith('kvsplice:'))}")


def test_live_metrics_types_and_model_name_label(exported):
    types = {f.name: f.type for f in exported if f.name.startswith("kvsplice:")}
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kv_cache_bytes_per_token",
                 "kv_cache_capacity_tokens", "kv_cache_bytes_in_use", "kv_cache_compression_ratio"):
        assert types.get(f"kvsplice:{name}") == "gauge", name
    for name in ("prompt_tokens", "generation_tokens", "request_success", "num_preemptions"):
        assert types.get(f"kvsplice:{name}") == "counter", name  # the parser drops _total
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prompt_tokens", "request_generation_tokens"):
        assert types.get(f"kvsplice:{name}") == "histogram", name
    samples = [s for f in exported if f.name.startswith("kvsplice:") for s in f.samples]
    assert samples
    for sample in samples:
        assert sample.labels.get("model_name"), f"{sample.name} has no model_name label"
    # After one finished request every histogram has a count and success has a reason.
    counts = {s.name: s.value for s in samples if s.name.endswith("_count")}
    assert counts.get("kvsplice:e2e_request_latency_seconds_count", 0) >= 1, counts
    assert any(s.name == "kvsplice:request_success_total" and s.labels.get("finished_reason") for s in samples)


def test_container_healthcheck_script_against_live_server(live_server):
    _, port, _ = live_server
    script = DEPLOY / "docker" / "healthcheck.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSPLICE_")}
    ok = _run([sys.executable, str(script)], env={**env, "KVSPLICE_PORT": str(port)})
    assert ok.returncode == 0, ok.stderr
    down = _run([sys.executable, str(script)], env={**env, "KVSPLICE_PORT": str(_free_port())})
    assert down.returncode == 1 and "unhealthy" in down.stderr
    wrong = _run([sys.executable, str(script)],
                 env={**env, "KVSPLICE_HEALTHCHECK_URL": f"http://127.0.0.1:{port}/no-such-path"})
    assert wrong.returncode == 1 and "HTTP 404" in wrong.stderr
