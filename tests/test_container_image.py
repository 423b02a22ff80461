"""The image built and run for real: buildah (chroot isolation, no daemon) builds the Dockerfile's
CPU variant on a Debian base made by debootstrap, the server runs inside it as its unprivileged
user, and /health, /generate and /metrics answer from outside.

Skipped with the reason where buildah, debootstrap or root are missing (`make tools` installs
both). The base image is made once and kept in buildah's storage (localhost/kvsplice-base), and
the build reuses its cached layers, so a run after the first rebuilds only what changed. The
host's pip set-up (a local directory of wheels, a CA bundle for an intercepting proxy) is mounted
into the build when there is one, so the image gets the same CPU torch as the test environment.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO_ROOT, free_port, wait_until

BUILDAH, DEBOOTSTRAP = shutil.which("buildah"), shutil.which("debootstrap")
pytestmark = [
    pytest.mark.skipif(BUILDAH is None or DEBOOTSTRAP is None, reason="needs buildah and debootstrap (make tools)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah with chroot isolation and debootstrap need root"),
]
BASE, IMAGE, SUITE = "localhost/kvsplice-base:bookworm", "localhost/kvsplice:cpu-test", "bookworm"
BUILD_TIMEOUT_S = 1200


def run(*cmd: str, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd[:4])} ...: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc.stdout


def debian_mirror() -> str | None:
    """The Debian mirror this machine's apt uses (debootstrap needs one; none is written down here)."""
    for path in [*Path("/etc/apt/sources.list.d").glob("*.sources"), Path("/etc/apt/sources.list")]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] or (words[:1] == ["deb"] and len(words) > 1):
                uri = words[1]
                if "debian" in uri and "security" not in uri:
                    return uri
    return None


def ensure_base() -> None:
    if subprocess.run([BUILDAH, "inspect", BASE], capture_output=True).returncode == 0:
        return
    mirror = debian_mirror()
    if mirror is None:
        pytest.skip("no Debian mirror in this machine's apt sources for debootstrap")
    with tempfile.TemporaryDirectory(prefix="kvsplice-rootfs-") as rootfs:
        run(DEBOOTSTRAP, "--variant=minbase", "--include=python3,python3-venv,ca-certificates", SUITE, rootfs, mirror)
        container = run(BUILDAH, "from", "scratch").strip()
        run(BUILDAH, "copy", container, rootfs, "/")
        run(BUILDAH, "config", "--env", "LANG=C.UTF-8", container)
        run(BUILDAH, "commit", "--rm", container, BASE)


def pip_mounts() -> list[str]:
    """--volume/--build-arg pairs for the host's wheel directory and CA bundle, where it has them."""
    args = []
    links = os.environ.get("PIP_FIND_LINKS") or ("/opt/wheels" if Path("/opt/wheels").is_dir() else "")
    if links and Path(links).is_dir():
        args += ["--volume", f"{links}:/run/wheels:ro", "--build-arg", "PIP_FIND_LINKS=/run/wheels"]
    cert = os.environ.get("PIP_CERT")
    if cert and Path(cert).is_file():
        args += ["--volume", f"{cert}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    return args


@pytest.fixture(scope="module")
def image() -> dict:
    start = time.monotonic()
    ensure_base()
    base_s = time.monotonic() - start
    run(BUILDAH, "bud", "--isolation", "chroot", "--layers", "--format", "docker", "-f", "Dockerfile",
        "--build-arg", f"BASE_IMAGE={BASE}", "--build-arg", f"TORCH_VERSION={torch.__version__}",
        "--build-arg", "PROJECT_EXTRAS=", "--build-arg", "RUNTIME_BUILD_TOOLS=", *pip_mounts(),
        "-t", IMAGE, str(REPO_ROOT), timeout=BUILD_TIMEOUT_S)
    size = run(BUILDAH, "images", "--format", "{{.Size}}", IMAGE).strip()
    return {"base_s": base_s, "build_s": time.monotonic() - start - base_s, "size": size}


def test_image_runs_the_server_as_its_user_and_answers_from_outside(image, capsys):
    with capsys.disabled():
        print(f"\n[image] {IMAGE}: {image['size']}; base {image['base_s']:.0f} s, build {image['build_s']:.0f} s")
    config = run(BUILDAH, "inspect", "--format", "{{.Docker.Config.User}} {{.Docker.Config.Healthcheck.Test}}", IMAGE)
    assert config.startswith("10001:10001") and "kvsplice-healthcheck" in config
    container = run(BUILDAH, "from", IMAGE).strip()
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="kvsplice-image-", suffix=".log", delete=False)
    server = subprocess.Popen([BUILDAH, "run", "--isolation", "chroot", "--env", f"KVSPLICE_PORT={port}", container,
                               "--", "kvsplice", "serve", "--host", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert server.poll() is None, Path(log.name).read_text()[-3000:]
            try:
                return httpx.get(base + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(healthy, timeout=180, interval=0.5, message="/health in the container")
        r = httpx.post(base + "/generate", json={"prompt": "To be, or not to be", "max_tokens": 5}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5, r.text
        names = {s.name for f in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=10).text)
                 for s in f.samples}
        assert {"kvsplice:kv_cache_bytes_per_token", "kvsplice:generation_tokens_total"} <= names
        whoami = run(BUILDAH, "run", "--isolation", "chroot", container, "--", "id", "-u").strip()
        assert whoami == "10001"
        assert subprocess.run([BUILDAH, "run", "--isolation", "chroot", "--env", f"KVSPLICE_PORT={port}", container,
                               "--", "kvsplice-healthcheck"], capture_output=True).returncode == 0
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        subprocess.run([BUILDAH, "rm", container], capture_output=True)
        log.close()
