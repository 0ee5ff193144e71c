"""What every training launch shares: multi-host start-up and the run directory's layout."""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax


# glibc's malloc asks for transparent huge pages for its big blocks. XLA:CPU allocates a step's
# temporaries afresh on every call and glibc serves them with mmap, so each call page-faults them
# in 4 KiB at a time: 20-25% of a CPU training step (BENCHMARKS.md). Read only at start-up.
HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def hugepages_env(env: Mapping[str, str]) -> dict[str, str]:
  """`env` with HUGEPAGES_TUNABLE added to GLIBC_TUNABLES, for a child process (or a re-exec)."""
  tunables = env.get("GLIBC_TUNABLES", "")
  if HUGEPAGES_TUNABLE in tunables.split(":"):
    return dict(env)
  return dict(env, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGEPAGES_TUNABLE])))


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
