"""Connecting to Ray the same way from every stage.

A stage either joins the caller's Ray, a given address (``auto``, ``host:port``, ``ray://…``),
or starts a private local cluster. Local clusters stay on loopback: Ray 2.60 rewrites
``127.0.0.1`` to the machine's own address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set
before Ray starts (measured here; the GCS then listens on 127.0.0.1 only).
"""

from __future__ import annotations

import os

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def keep_local_ray_on_loopback() -> None:
    """Set the environment a loopback-only local cluster needs (before ``ray.init``)."""
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)


def connect(address: str | None = None, num_cpus: int | None = None, worker_logs: bool = True) -> bool:
    """Join ``address`` (or the already-initialised Ray); else start a local loopback cluster.

    Returns True if this call started Ray (the caller then shuts it down). ``worker_logs=False``
    keeps workers' output in the session's log files instead of the console (errors still raise).
    """
    if not address:
        keep_local_ray_on_loopback()  # read when Ray is imported, so set it first
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=worker_logs)
    else:
        # address="local": a new cluster even if RAY_ADDRESS or a leftover local cluster exists.
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus, log_to_driver=worker_logs)
    return True
