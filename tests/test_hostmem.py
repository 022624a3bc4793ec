"""Host memory: freed step-sized buffers are reused, not faulted in again every step."""

import json
import os
import subprocess
import sys

import pytest

from t2x import hostmem

# A step's worth of large buffers, malloc'd, written and freed ten times in a thread other
# than the main one (as XLA's are); the page faults of the last nine rounds. (Not numpy's
# arrays: numpy asks for huge pages, which fault 512 times less.)
_ROUNDS = """
import ctypes, json, resource, threading
from t2x.hostmem import keep_freed_memory

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

applied = keep_freed_memory()
faults = []

def rounds():
    for i in range(10):
        if i == 1:
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        blocks = [libc.malloc(48 << 20) for _ in range(3)]
        for b in blocks:
            ctypes.memset(b, i, 48 << 20)
        for b in blocks:
            libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

t = threading.Thread(target=rounds)
t.start()
t.join()
print(json.dumps({"applied": applied, "faults": faults[1] - faults[0]}))
"""


def _run(setting: str, script: str = _ROUNDS) -> dict:
    env = {**os.environ, hostmem.ENV: setting}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_buffers_are_reused_not_faulted_in_again():
    pages = 9 * 3 * (48 << 20) // os.sysconf("SC_PAGE_SIZE")  # the nine rounds' pages
    system, kept = _run("system"), _run("keep")
    assert not system["applied"] and kept["applied"]
    assert system["faults"] > pages * 0.9  # glibc unmaps each block on free: every page again
    assert kept["faults"] < pages * 0.05


# Jitted steps dispatched back to back, each one's input the last one's output as in
# training, each with a 64 MB buffer of its own that lives while it runs: the page faults
# over the last 55 steps.
_STEPS = """
import json, resource
from t2x.hostmem import keep_freed_memory

applied = keep_freed_memory()
import jax
import jax.numpy as jnp

@jax.jit
def step(x):
    big = jax.lax.optimization_barrier(jnp.outer(x, x) + 1.0)
    return x + (big @ jnp.tanh(big[:, :512])).sum(1) * 1e-12

x = step(step(jnp.ones(4096))).block_until_ready()
faults = []
for i in range(60):
    if i == 5:
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    x = step(x)
x.block_until_ready()
faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
print(json.dumps({"applied": applied, "faults": faults[1] - faults[0],
                  "async_dispatch": jax.config.read("jax_cpu_enable_async_dispatch")}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_steps_dispatched_back_to_back_reuse_their_buffers():
    """With glibc's defaults every step faults its block in again. Kept, with JAX's
    asynchronous dispatch, the next step often allocated before the last one freed, so
    the heap grew by 1 to 9 blocks over 80 steps and 14,000-180,000 pages were faulted
    again (4 runs); the setting runs steps synchronously, after which most runs reuse
    one block throughout (11 of 12 alone, with one device), though the heap still grows
    by a block now and then (once by 5 blocks in 6 runs here, with 8 host devices)."""
    pages = 55 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    system, kept = _run("system", _STEPS), _run("keep", _STEPS)
    assert system["async_dispatch"] and not kept["async_dispatch"]
    assert system["faults"] > pages * 0.9
    assert kept["faults"] < pages * 0.25


_LATE = """
import json, warnings
import jax.numpy as jnp
jnp.ones(2).block_until_ready()
from t2x.hostmem import keep_freed_memory
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    applied = keep_freed_memory()
print(json.dumps({"applied": applied, "warnings": [str(w.message) for w in caught]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_applied_after_jax_started_says_so():
    late = _run("keep", _LATE)
    assert late["applied"] and "ran after JAX created its CPU client" in " ".join(late["warnings"])
    assert "T2X_HOST_MALLOC=system" in " ".join(late["warnings"])


def test_cpu_only_by_default(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not hostmem.accelerator_installed()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert hostmem.accelerator_installed()
    monkeypatch.setenv(hostmem.ENV, "system")
    assert hostmem.keep_freed_memory() is hostmem._applied  # leaves the allocator as it is


def test_bad_setting_is_named(monkeypatch):
    monkeypatch.setattr(hostmem, "_applied", False)
    monkeypatch.setenv(hostmem.ENV, "tcmalloc")
    with pytest.raises(ValueError, match="T2X_HOST_MALLOC must be auto, keep or system"):
        hostmem.keep_freed_memory()
