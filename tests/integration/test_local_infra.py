"""infra/local/start.sh + stop.sh for real: a Ray head and an MLflow server on free loopback ports.

One test (~50 s: Ray and MLflow start in parallel, MLflow's first start dominates). It checks
what the scripts promise: both servers answer with the exports printed, every socket they
listen on is loopback, Ray enforces its token, a second start is a no-op, and stop.sh leaves
no process of either group behind.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "infra" / "local" / "start.sh"
STOP = ROOT / "infra" / "local" / "stop.sh"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def parse_exports(text: str) -> dict[str, str]:
    """``export KEY='value'`` lines (what start.sh prints and writes to env.sh)."""
    exports = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            key, _, value = words[1].partition("=")
            exports[key] = value
    return exports


def http_get(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def listening_addresses(pgids: set[int]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of the LISTEN TCP sockets held by any process of these groups (procfs)."""
    inodes = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) not in pgids:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                # procfs prints each 32-bit word of the address in host (little-endian) order.
                packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                addresses.append(ipaddress.ip_address(packed))
    return addresses


def is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.integration
def test_local_start_stop(tmp_path):
    gcs_port, dashboard_port, mlflow_port = free_ports(3)
    state = tmp_path / "local"
    env = {
        **os.environ,
        "VISTR_LOCAL_DIR": str(state),
        "VISTR_VENV": sys.prefix,  # the interpreter running the tests owns ray/mlflow
        "VISTR_RAY_PORT": str(gcs_port),
        "VISTR_RAY_DASHBOARD_PORT": str(dashboard_port),
        "VISTR_MLFLOW_PORT": str(mlflow_port),
        "VISTR_RAY_NUM_CPUS": "1",
    }

    def run(script: Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=300)

    pgids: set[int] = set()
    try:
        started = run(START)
        assert started.returncode == 0, started.stderr
        pgids = {int((state / f"{name}.pgid").read_text()) for name in ("ray", "mlflow")}
        exports = parse_exports(started.stdout)
        assert exports == parse_exports((state / "env.sh").read_text())
        assert exports["RAY_ADDRESS"] == f"127.0.0.1:{gcs_port}"
        assert exports["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{dashboard_port}"
        assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{mlflow_port}"

        # Idempotent: a second start finds both running and starts nothing.
        again = run(START)
        assert again.returncode == 0, again.stderr
        assert again.stderr.count("already running") == 2, again.stderr
        assert {int((state / f"{name}.pgid").read_text()) for name in ("ray", "mlflow")} == pgids

        # Ray: the dashboard answers with the token and refuses without it (token auth is on).
        token = Path(exports["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        status, body = http_get(f"{exports['RAY_API_SERVER_ADDRESS']}/api/version", token)
        assert status == 200 and json.loads(body)["ray_version"] == version("ray")
        assert http_get(f"{exports['RAY_API_SERVER_ADDRESS']}/api/version")[0] == 401
        # The GCS answers a client that has only the printed exports: RAY_AUTH_MODE=token (with the
        # token path) must be in the client's environment before it starts (reference notes), and
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps it from rewriting 127.0.0.1 (see start.sh).
        client_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | exports
        ray_status = subprocess.run(
            [str(Path(sys.prefix) / "bin" / "ray"), "status"],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ray_status.returncode == 0, ray_status.stdout + ray_status.stderr
        assert re.search(r"\d+\.\d+/1\.0 CPU", ray_status.stdout), ray_status.stdout

        # MLflow: /health, then a write and a read through the sqlite store.
        uri = exports["MLFLOW_TRACKING_URI"]
        assert http_get(f"{uri}/health") == (200, b"OK")
        created = http_post_json(f"{uri}/api/2.0/mlflow/experiments/create", {"name": "infra-test"})
        status, body = http_get(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=infra-test")
        assert status == 200 and json.loads(body)["experiment"]["experiment_id"] == created["experiment_id"]

        # Nothing either server started listens beyond loopback.
        addresses = listening_addresses(pgids)
        assert len(addresses) >= 3, addresses  # at least GCS, dashboard, MLflow
        assert all(is_loopback(a) for a in addresses), addresses

        stopped = run(STOP)
        assert stopped.returncode == 0, stopped.stderr
        assert not [g for g in pgids if group_alive(g)], "processes left after stop.sh"
        assert not (state / "ray.pgid").exists() and not (state / "mlflow.pgid").exists()
        for port in (gcs_port, dashboard_port, mlflow_port):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if (
            any(group_alive(g) for g in pgids)
            or (state / "ray.pgid").exists()
            or (state / "mlflow.pgid").exists()
        ):
            run(STOP)
        for pgid in filter(group_alive, pgids):
            os.killpg(pgid, signal.SIGKILL)
