"""t2x: pretrain Transformer language models with JAX and Flax on a device mesh."""

import os as _os

# XLA:CPU's default scheduler lets the thunks of one program run its independent
# collectives concurrently. With several devices in one process (virtual CPU devices, as
# in tests and on CPU hosts) every thread of its pool can end up waiting in a different
# collective's rendezvous, and the program deadlocks; FSDP meshes hit it within a few
# steps. The sequential schedule avoids it. The flag only concerns the CPU backend, and it
# must be set before JAX creates one.
_CPU_SCHEDULE = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _CPU_SCHEDULE not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {_CPU_SCHEDULE}=false".strip()
