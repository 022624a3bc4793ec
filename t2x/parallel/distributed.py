"""Joining a multi-process job with JAX's own multi-controller runtime.

Every host runs the same program; ``jax.distributed.initialize`` connects the processes
through a coordinator (process 0). Its arguments come from config, from JAX's
environment variables (``JAX_COORDINATOR_ADDRESS``, ``JAX_LOCAL_DEVICE_IDS``, ...), or
from JAX's own cluster detection: TPU pods (GCE and GKE), SLURM, Open MPI and
Kubernetes. A process that is not part of a job stays a single process and nothing
changes.

JAX ends a process with a C++ abort, not an error, when the coordinator's port is taken
or the coordinator cannot be reached; both are checked first and reported here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from t2x.config import ConfigError, DistributedConfig

log = logging.getLogger(__name__)

_HOSTS: dict[int, dict] = {}  # process id -> {"host": name, "addresses": [...]}, once joined
_CLUSTER_NAMES = {"Slurm": "SLURM", "Ompi": "Open MPI", "GceTpu": "Cloud TPU (GCE)", "GkeTpu": "Cloud TPU (GKE)",
                  "BaseTpu": "Cloud TPU", "K8s": "Kubernetes"}


def detected_cluster() -> str | None:
    """The cluster environment JAX's auto-detection finds (SLURM, Open MPI, Cloud TPU, ...), or None."""
    try:
        from jax._src import clusters  # JAX's own detection; no public API lists it
    except ImportError:
        return None
    for env in getattr(clusters.ClusterEnv, "_cluster_types", []):
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                name = env.__name__.removesuffix("Cluster")
                return _CLUSTER_NAMES.get(name, name)
        except Exception:  # a detector that cannot tell (no metadata server, say) has found nothing
            continue
    return None


def _resolve(explicit: dict, timeout: int, source: str) -> dict:
    """Fill what config leaves unset from JAX's environment variables and cluster detection."""
    resolved = dict(explicit)
    resolved["coordinator_address"] = resolved["coordinator_address"] or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if None in resolved.values() or resolved["local_device_ids"] is None:
        try:
            from jax._src import clusters

            address, count, index, device_ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
                resolved["coordinator_address"], resolved["num_processes"], resolved["process_id"],
                resolved["local_device_ids"], None, timeout,
            )
            resolved.update(coordinator_address=address, num_processes=count, process_id=index)
            if device_ids is not None:
                resolved["local_device_ids"] = list(device_ids)
        except (ImportError, AttributeError):  # JAX moved its detection: let initialize() do it
            pass
        except Exception as e:  # a detected environment that lacks what it needs (a variable, say)
            raise ConfigError(
                f"{source} looks like a multi-process job, but its settings cannot be read ({type(e).__name__}: "
                f"{e}); complete them, or set distributed.mode=off to run a single process"
            ) from None
    return resolved


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"distributed.coordinator_address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _check_port_free(address: str) -> None:
    _, port = _split(address)
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, port))
            return
        except OSError as e:
            if e.errno == 98 or "in use" in str(e).lower():
                raise ConfigError(
                    f"the coordinator port {port} is already in use on this host (another job?); choose another "
                    "port in distributed.coordinator_address (or JAX_COORDINATOR_ADDRESS / JAX_COORDINATOR_PORT)"
                ) from None
            continue  # this address family is not available here; try the other


def _wait_for_coordinator(address: str, timeout: int) -> None:
    host, port = _split(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"cannot reach the coordinator at {address} within {timeout} s "
                    f"(distributed.initialization_timeout): {e.strerror or e}; check that process 0 is running and "
                    "that distributed.coordinator_address names its host and port"
                ) from None
            time.sleep(0.5)


def initialize(cfg: DistributedConfig) -> bool:
    """Connect this process to the other processes of its job, if it belongs to one.

    Must run before any JAX computation. On CPU the processes communicate through the
    collectives library ``cfg.cpu_collectives`` (gloo). With ``mode: auto`` a process
    that nothing configures or detects as part of a job stays single; once a job is
    configured or detected, failing to join it is an error.

    Returns:
      True if this process is now part of a multi-process runtime.

    Raises:
      ConfigError: the job's settings are incomplete or inconsistent, the coordinator's
        port is taken, or the coordinator cannot be reached.
    """
    if cfg.mode == "off":
        return False
    if jax.distributed.is_initialized():
        return True
    explicit = {
        "coordinator_address": cfg.coordinator_address,
        "num_processes": cfg.num_processes,
        "process_id": cfg.process_id,
        "local_device_ids": list(cfg.local_device_ids) if cfg.local_device_ids is not None else None,
    }
    given = {k: v for k, v in explicit.items() if v is not None}
    cluster = detected_cluster()
    if not given and cluster is None and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        if cfg.mode == "on":
            raise ConfigError(
                "distributed.mode=on, but no multi-process job is configured or detected; set "
                "distributed.coordinator_address, distributed.num_processes and distributed.process_id, or run "
                "under SLURM, Open MPI, Kubernetes or a TPU pod"
            )
        return False
    source = "the distributed.* settings" if given else f"the {cluster} environment" if cluster else "JAX_COORDINATOR_ADDRESS"
    resolved = _resolve(explicit, cfg.initialization_timeout, source)
    address, process_id = resolved["coordinator_address"], resolved["process_id"]
    if address is None or resolved["num_processes"] is None or process_id is None:
        missing = [k for k in ("coordinator_address", "num_processes", "process_id") if resolved[k] is None]
        raise ConfigError(
            f"{source} describes a multi-process job but not its {', '.join(missing)}; set "
            + ", ".join(f"distributed.{k}" for k in missing)
        )
    if process_id == 0:
        _check_port_free(address)
    else:
        _wait_for_coordinator(address, cfg.initialization_timeout)
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    try:
        jax.distributed.initialize(
            **resolved,
            initialization_timeout=cfg.initialization_timeout,
            heartbeat_timeout_seconds=cfg.heartbeat_timeout,
            shutdown_timeout_seconds=cfg.shutdown_timeout,
        )
    except (ValueError, RuntimeError, TypeError) as e:
        raise ConfigError(f"cannot join the multi-process job that {source} describes ({e})") from None
    _record_hosts()
    log.info(
        "process %d of %d joined the job; %d of its %d devices are local",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return True


def _record_hosts() -> None:
    """Learn every process's host, to name the one that is lost if a collective fails."""
    name = socket.gethostname()
    try:
        addresses = sorted({info[4][0] for info in socket.getaddrinfo(name, None)})
    except OSError:
        addresses = []
    me = json.dumps({"host": name, "addresses": addresses}).encode()[:1024]
    buffer = np.zeros(1024, np.uint8)
    buffer[: len(me)] = np.frombuffer(me, np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(buffer))
    for process, row in enumerate(everyone):
        _HOSTS[process] = json.loads(row.tobytes().rstrip(b"\0").decode())


def lost_processes(error: BaseException) -> list[int]:
    """The processes a failed collective's error points at (by the peer address it names),
    other than this one; empty when it names none."""
    match = re.search(r"\[([0-9a-fA-F.:]+)\]:\d+", str(error))
    if not match or not _HOSTS:
        return []
    peer, me = match.group(1), jax.process_index()
    if peer.startswith("127.") or peer == "::1":  # loopback: a process on this host
        here = _HOSTS.get(me, {}).get("host")
        return [p for p, h in _HOSTS.items() if p != me and h["host"] == here]
    return [p for p, h in _HOSTS.items() if p != me and peer in h["addresses"]]


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process of the job (every process must call this)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def sum_over_processes(counts: dict[str, int]) -> dict[str, int]:
    """Integer counts summed over the processes of the job (every process must call this)."""
    if jax.process_count() == 1:
        return counts
    keys = sorted(counts)
    totals = np.sum(multihost_utils.process_allgather(np.array([counts[k] for k in keys], np.int64)), axis=0)
    return {k: int(v) for k, v in zip(keys, totals)}
