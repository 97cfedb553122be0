"""Session-scoped Ray clusters for the integration tests, both kept on loopback.

- ``ray_local``: an in-process local cluster (``ray.init`` with 2 CPUs), shared by every test of
  the session because starting one costs 6-13 s. Tests call Ray APIs directly in this process.
- ``ray_head``: a real head started with ``ray start --head --block`` in its own process group, for
  tests of the "connect to a running cluster" path (``--address``, Ray Jobs). Drivers run as
  subprocesses with ``ray_head.env`` (address + auth). It is stopped by signalling *its* process
  group, never with ``ray stop``, which would kill every Ray on the machine, other sessions' too.

The head uses token authentication with a token of its own (not ``~/.ray/auth_token``), free ports
for everything Ray would otherwise take at fixed defaults, and a short temp dir of its own (Ray's
unix sockets live there; their paths are limited to ~107 bytes).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipelines.ray_runtime import LOOPBACK_ENV, keep_local_ray_on_loopback

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """The ``ray`` module, initialised once per session as a 2-CPU local cluster on 127.0.0.1."""
    keep_local_ray_on_loopback()
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",  # a new cluster even if RAY_ADDRESS or another local cluster exists
            _node_ip_address="127.0.0.1",
            num_cpus=2,
            dashboard_port=free_port(),
            log_to_driver=False,  # worker logs stay in the session dir, not in the test output
        )
    yield ray
    if started:
        ray.shutdown()


@dataclass
class RayHead:
    """A running ``ray start --head`` cluster and what a driver subprocess needs to reach it."""

    address: str  # host:port of the GCS, for ray.init(address=...) / --address
    dashboard_url: str  # Jobs API / dashboard
    env: dict[str, str] = field(repr=False)  # environment for driver subprocesses (address + auth)
    token: str = field(repr=False)
    log: Path = field(repr=False)

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def run(self, args: list[str], timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a driver command (e.g. ``[sys.executable, "-m", "vistr.cli", ...]``) against this head."""
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs)


def _wait_ready(proc: subprocess.Popen, url: str, headers: dict[str, str], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"Ray head did not answer {url} within {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-4000:]}"
    )


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the head's process group, SIGKILL what is left after STOP_TIMEOUT_S."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        proc.poll()
        time.sleep(0.2)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A 2-CPU ``ray start --head --node-ip-address 127.0.0.1`` cluster, stopped at session end."""
    state = tmp_path_factory.mktemp("ray_head")
    token = secrets.token_hex(32)
    token_file = state / "auth_token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    port, dashboard_port = free_port(), free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="vistr-rh-", dir="/tmp"))
    auth = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        # Without it Ray 2.60 rewrites 127.0.0.1 to the machine's own address (clients need it too).
        **LOOPBACK_ENV,
    }
    head_env = {
        **os.environ,
        **auth,
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # one node: nothing to drain on SIGTERM
        "AUTOSCALER_METRIC_PORT": str(free_port()),
        "DASHBOARD_METRIC_PORT": str(free_port()),
    }
    ray_bin = str(Path(sys.executable).with_name("ray"))  # the venv's Ray: workers get the venv's Python
    log = state / "ray.log"
    # fmt: off
    cmd = [
        ray_bin, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--port", str(port), "--dashboard-port", str(dashboard_port), "--num-cpus", "2",
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--temp-dir", str(temp_dir),
    ]
    # fmt: on
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=head_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = RayHead(
        address=f"127.0.0.1:{port}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        env={**os.environ, **auth, "RAY_ADDRESS": f"127.0.0.1:{port}"},
        token=token,
        log=log,
    )
    try:
        _wait_ready(proc, f"{head.dashboard_url}/api/version", head.auth_headers, log)
        yield head
    finally:
        _stop_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class MlflowServer:
    """A running ``mlflow server`` (sqlite backend, local artifact root) on 127.0.0.1."""

    url: str  # tracking URI for MlflowClient / tracking.tracking_uri
    artifacts: Path = field(repr=False)  # where the server stores artifacts (--artifacts-destination)
    log: Path = field(repr=False)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server --workers 1`` in its own process group, stopped at session end.

    It spawns uvicorn, a job runner and huey consumers: the whole group is signalled, not only the
    CLI process. The first start creates the sqlite schema (~30 s here).
    """
    state = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    artifacts = state / "artifacts"
    log = state / "mlflow.log"
    # fmt: off
    cmd = [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}", "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    # fmt: on
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = MlflowServer(url=f"http://127.0.0.1:{port}", artifacts=artifacts, log=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not answer /health within {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-4000:]}"
                )
            time.sleep(0.5)
        yield server
    finally:
        _stop_group(proc)
