"""What every training launch shares: multi-host start-up and the run directory's layout."""

from __future__ import annotations

import json
import os

import jax


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Joins a multi-host run (`jax.distributed.initialize`); a no-op for a single process.

  On TPU pods and SLURM/GKE clusters JAX finds its peers itself: pass `auto` as the address.
  """
  if not coordinator_address:
    return
  if coordinator_address == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def prepare_workdir(workdir: str, config: dict) -> None:
  """Creates the run directory and records the config (host 0 only)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
