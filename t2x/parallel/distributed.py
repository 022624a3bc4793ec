"""Joining a multi-process job with JAX's own multi-controller runtime.

Every host runs the same program; ``jax.distributed.initialize`` connects the processes
through a coordinator (process 0). Its arguments come from config, from JAX's
environment variables (``JAX_COORDINATOR_ADDRESS``, ``JAX_LOCAL_DEVICE_IDS``, ...), or
from JAX's own cluster detection: TPU pods (GCE and GKE), SLURM, Open MPI and
Kubernetes. A process that is not part of a job stays a single process and nothing
changes.

JAX ends a process with a C++ abort, not an error, when the coordinator's port is taken
or the coordinator cannot be reached; both are checked first and reported here. It also
notices a process that dies only when its heartbeats stop, and then aborts the others
the same way; so every process keeps a TCP connection to process 0 (see ``_PeerWatch``),
and the end of one is seen at once and reported by name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import socket
import sys
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from t2x.config import ConfigError, DistributedConfig
from t2x.parallel.mesh import keep_cpu_collectives_in_order

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
    keep_cpu_collectives_in_order()  # before the first program with collectives
    _record_hosts()
    _PeerWatch.start(address, cfg.initialization_timeout)
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


class _PeerWatch:
    """Every process keeps one TCP connection with process 0; a connection that closes
    without a goodbye means that process ended abnormally. Process 0 tells the others
    which process it lost, then ends; the others end when they hear it, or when process
    0's own connection closes. Each ends at once, naming the lost process, wherever the
    main thread is blocked (a collective waiting for the dead process, say).

    Where the connections cannot be made (a firewall between hosts), a warning says so and
    JAX's heartbeat timeout remains the only detection.
    """

    _connections: list[tuple[int, socket.socket]] = []
    _ending = False

    @classmethod
    def start(cls, coordinator: str, timeout: int) -> None:
        me, count = jax.process_index(), jax.process_count()
        try:
            listener = None
            if me == 0:
                host = _local_address(coordinator)
                listener = socket.create_server(("", 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                                backlog=count)
                endpoint = np.frombuffer(f"{host} {listener.getsockname()[1]}".encode().ljust(64), np.uint8)
            else:
                endpoint = np.zeros(64, np.uint8)
            endpoint = multihost_utils.broadcast_one_to_all(endpoint)
            host, port = bytes(np.asarray(endpoint)).decode().split()
            if me == 0:
                listener.settimeout(timeout)
                for _ in range(count - 1):
                    connection, _ = listener.accept()
                    peer = int(connection.recv(16).decode().strip() or -1)
                    cls._connections.append((peer, connection))
                listener.close()
            else:
                connection = socket.create_connection((host, int(port)), timeout=timeout)
                connection.sendall(f"{me}".encode().ljust(16))
                cls._connections.append((0, connection))
        except (OSError, ValueError) as e:
            log.warning("cannot watch the other processes over TCP (%s); a process that dies is noticed only after "
                        "distributed.heartbeat_timeout", e)
            cls.close()
            return
        threading.Thread(target=cls._watch, name="t2x-peer-watch", daemon=True).start()

    @classmethod
    def _watch(cls) -> None:
        selector = selectors.DefaultSelector()
        for peer, connection in cls._connections:
            connection.settimeout(None)
            selector.register(connection, selectors.EVENT_READ, peer)
        while True:
            for key, _ in selector.select():
                peer, connection = key.data, key.fileobj
                try:
                    message = connection.recv(64).decode(errors="replace")
                except OSError:
                    message = ""
                if message.startswith("bye"):
                    selector.unregister(connection)
                    continue
                lost = int(message.split()[1]) if message.startswith("lost") else peer
                if cls._ending:
                    return
                cls._end(lost)

    @classmethod
    def _end(cls, lost: int) -> None:
        for _, connection in cls._connections:  # process 0 tells the others who was lost
            try:
                connection.sendall(f"lost {lost}".encode())
            except OSError:
                pass
        print(f"t2x: error: process {jax.process_index()} lost contact with process {lost} of the job, which "
              "ended without finishing (it died, was killed, or failed: see its log); rerun every process to "
              "resume from the last checkpoint", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    @classmethod
    def close(cls) -> None:
        """Say goodbye: this process is ending normally."""
        cls._ending = True
        for _, connection in cls._connections:
            try:
                connection.sendall(b"bye")
                connection.close()
            except OSError:
                pass
        cls._connections = []


def finished() -> None:
    """Tell the other processes that this one ends normally (call it last)."""
    _PeerWatch.close()


def _local_address(coordinator: str) -> str:
    """The address of this host on the interface that reaches the coordinator."""
    host = coordinator.rsplit(":", 1)[0].strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # no packet is sent: this only picks the route
        return probe.getsockname()[0]
