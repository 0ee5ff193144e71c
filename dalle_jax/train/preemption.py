"""Stopping on SIGTERM (how TPU VMs, SLURM and Kubernetes preempt) or SIGINT at a step every
process agrees on, so that the trainer saves a checkpoint there and exits.

One process: a signal handler notes the signal and the loop stops after the step in flight. Several
processes: JAX's preemption sync manager (started by `jax.distributed.initialize`) catches SIGTERM
on any host, tells the others through the coordination service, and
`multihost_utils.reached_preemption_sync_point` turns True on every host at the same step; SIGINT
is passed on to it as a SIGTERM to this process. A second signal of the same kind kills at once.
"""

from __future__ import annotations

import os
import signal
import sys

import jax
from jax.experimental import multihost_utils

# EX_TEMPFAIL: stopped on request with a checkpoint at the step reached; run again to continue.
PREEMPTED_EXIT_CODE = 75


class PreemptionWatch:
  """`reached(step)` is True at the step where every process stops; call it at every step."""

  def __init__(self):
    self.signal_name: str | None = None
    self._multi = jax.process_count() > 1
    if self._multi:
      signal.signal(signal.SIGINT, self._to_sigterm)
    else:
      for kind in (signal.SIGTERM, signal.SIGINT):
        signal.signal(kind, self._note)

  def _note(self, number, frame):
    del frame
    self.signal_name = signal.Signals(number).name
    signal.signal(number, signal.SIG_DFL)

  def _to_sigterm(self, number, frame):
    del frame
    self.signal_name = signal.Signals(number).name
    signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal_name is not None

  def exit(self, step: int, num_steps: int) -> None:
    """Says where the run stopped (host 0) and exits with PREEMPTED_EXIT_CODE."""
    if jax.process_index() == 0:
      cause = self.signal_name or "a preemption notice"
      print(f"stopped by {cause} at step {step} of {num_steps}: checkpoint saved; run the same "
            "command to continue", flush=True)
    sys.exit(PREEMPTED_EXIT_CODE)
