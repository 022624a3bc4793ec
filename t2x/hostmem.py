"""Host memory on CPU-only machines: keep what XLA frees for its next step.

XLA:CPU allocates each step's temporary buffers (hundreds of MB for a small GPT, 3 GB for
GPT-2 small) as one ``malloc`` and frees it when the step ends. glibc serves blocks that
large with fresh ``mmap``s and unmaps them on ``free``, so every step faults its buffers
back in page by page, each page zeroed by the kernel: about half a second per GB on a
2-core CPU, a sixth of a small GPT's step. ``keep_freed_memory`` makes glibc keep freed
memory in the process for reuse: large blocks come from the heap (no ``mmap``), the heap
is never trimmed, and all threads share the one heap (other threads' arenas would
``mmap`` their large blocks regardless).

It also turns off JAX's asynchronous dispatch on the CPU. With it on, the next step's
buffers are allocated as soon as the previous step's outputs are ready, often before
XLA's thread has freed the previous step's: the heap then grows by a step's buffers and
small allocations split the freed block, so the process grew by one more step's buffers
every few steps. Run synchronously, a step has nearly always freed its buffers when the
call returns, and the next step gets the same block back: the process holds its train
state, one step's buffers and what compiling took, about what it peaks at with glibc's
defaults. The Python loop no longer runs ahead of the step, which on a CPU computes on the
same cores anyway.

It applies only on glibc and, by default, only where no accelerator plugin is installed
(an accelerator's step buffers live on the device; a busy input pipeline on a large host
would contend on one heap). ``T2X_HOST_MALLOC=keep`` applies it anyway, ``=system``
never. It must run before the threads that allocate the buffers exist and before JAX
creates its CPU client, so ``t2x``'s command line calls it first.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import warnings

ENV = "T2X_HOST_MALLOC"
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied = False


def accelerator_installed() -> bool:
    """Whether JAX may find a GPU or TPU here: ``JAX_PLATFORMS`` names one, or, with it
    unset, a PJRT plugin or libtpu is installed."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return any(p != "cpu" for p in platforms)
    if importlib.util.find_spec("libtpu") is not None:
        return True
    try:
        import jax_plugins
    except ImportError:
        return False
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def _glibc_mallopt():
    """glibc's ``mallopt``, or None on another C library (macOS, musl)."""
    try:
        if "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""):
            return None
        return ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):
        return None


def keep_freed_memory(choice: str | None = None) -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring), where it
    applies; returns whether it is in effect. ``choice``: auto, keep or system (default:
    ``T2X_HOST_MALLOC``, else auto). Safe to call more than once."""
    global _applied
    choice = choice or os.environ.get(ENV, "auto")
    if choice not in ("auto", "keep", "system"):
        raise ValueError(f"{ENV} must be auto, keep or system, got {choice!r}")
    if _applied or choice == "system" or (choice == "auto" and accelerator_installed()):
        return _applied
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # A trim threshold of -1 turns trimming off (any positive int stops at 2 GiB, below
    # GPT-2 small's step buffers).
    _applied = all(mallopt(param, value) == 1 for param, value in
                   ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    if _applied:
        import jax
        from jax._src import xla_bridge

        if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
            warnings.warn("t2x.hostmem.keep_freed_memory() ran after JAX created its CPU client, so steps stay "
                          "asynchronous and the kept heap can grow by a step's buffers at a time: call it before any "
                          f"JAX computation, or set {ENV}=system", RuntimeWarning, stacklevel=2)
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return _applied
