"""Joining a multi-process job with JAX's own multi-controller runtime.

Every host runs the same program; ``jax.distributed.initialize`` connects the processes
through a coordinator (process 0). Its arguments come from config, from JAX's
environment variables (``JAX_COORDINATOR_ADDRESS``, ``JAX_LOCAL_DEVICE_IDS``, ...), or
from JAX's own cluster detection: TPU pods (GCE and GKE), SLURM and Open MPI. A process
that is not part of a job stays a single process and nothing changes.
"""

from __future__ import annotations

import logging

import jax

from t2x.config import ConfigError, DistributedConfig

log = logging.getLogger(__name__)

_NO_CLUSTER = "coordinator_address should be defined"


def initialize(cfg: DistributedConfig) -> bool:
    """Connect this process to the other processes of its job, if it belongs to one.

    Must run before any JAX computation. On CPU the processes communicate through the
    collectives library ``cfg.cpu_collectives`` (gloo).

    Returns:
      True if this process is now part of a multi-process runtime.

    Raises:
      ConfigError: the job's settings are incomplete or inconsistent.
    """
    if cfg.mode == "off":
        return False
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    explicit = {
        "coordinator_address": cfg.coordinator_address,
        "num_processes": cfg.num_processes,
        "process_id": cfg.process_id,
        "local_device_ids": list(cfg.local_device_ids) if cfg.local_device_ids is not None else None,
    }
    try:
        jax.distributed.initialize(
            **explicit,
            initialization_timeout=cfg.initialization_timeout,
            heartbeat_timeout_seconds=cfg.heartbeat_timeout,
            shutdown_timeout_seconds=cfg.shutdown_timeout,
        )
    except (ValueError, RuntimeError) as e:
        given = {k: v for k, v in explicit.items() if v is not None}
        if cfg.mode == "auto" and not given:
            # No cluster around and nothing asked for, or JAX already in use in this
            # process (a library caller): stay one process.
            if _NO_CLUSTER in str(e) or isinstance(e, RuntimeError):
                return False
        raise ConfigError(
            f"cannot join the multi-process job ({e}); set distributed.coordinator_address, "
            "distributed.num_processes and distributed.process_id, or run under SLURM, Open MPI or a TPU pod"
        ) from None
    log.info(
        "process %d of %d joined the job; %d of its %d devices are local",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return True
