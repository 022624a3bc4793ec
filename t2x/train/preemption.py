"""Stopping cleanly when the scheduler asks: SIGTERM (and Ctrl-C) ends a run at a step
every process agrees on, after checkpointing it.

In a multi-process job JAX's preemption service catches SIGTERM on any process and picks
a step at which ``multihost_utils.reached_preemption_sync_point`` turns true on all of
them together; Ctrl-C (SIGINT) on a process is passed on to it as SIGTERM, and a second
Ctrl-C stops at once. A single process handles the signals itself.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils


class StopRequest:
    """Answers, once per step, whether the run should checkpoint and stop now.

    A second Ctrl-C in a single-process run stops at once, without checkpointing.
    """

    def __init__(self):
        self._multi = jax.process_count() > 1
        self._requested = False
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        # With several processes SIGTERM belongs to JAX's preemption service.
        for sig in (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self._requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._requested = True
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)

    def __call__(self, step: int) -> bool:
        """True at the step where every process should save and stop."""
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
