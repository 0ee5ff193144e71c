"""What every training launch shares: multi-host start-up and the run directory's layout."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any, Callable, Mapping

import jax
from ml_collections import config_dict
import tqdm

from dalle_jax import checkpointing, metrics_log


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


def config_section(cls: type, **values: Any) -> config_dict.ConfigDict:
  """A config file's section for the dataclass `cls`: `values` over every default of `cls`.

  Listing every field lets any of them be overridden from the command line
  (`--config.train.tau_end=0.1`); ml_collections refuses fields a config does not hold. A None
  becomes a placeholder of the field's type (ml_collections cannot parse into a None), and an int
  given for a float field a float (or `--config...=2.5` would be refused as not an int).
  """
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise TypeError(f"{cls.__name__} has no field {unknown}; its fields: {sorted(fields)}")
  hints = typing.get_type_hints(cls)
  section = {}
  for name, field in fields.items():
    if name in values:
      value = values[name]
    elif field.default is not dataclasses.MISSING:
      value = field.default
    elif field.default_factory is not dataclasses.MISSING:
      value = field.default_factory()
    else:
      raise TypeError(f"{cls.__name__}.{name} has no default: give it a value")
    hint = hints[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
      hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if value is None:
      value = config_dict.placeholder(typing.get_origin(hint) or hint)
    elif hint is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    section[name] = value
  return config_dict.ConfigDict(section)


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


def open_run(workdir: str, config: Mapping[str, Any], init_state: Callable[[jax.Array], Any],
             create_state: Callable[[], Any], shardings: Any
             ) -> tuple[Any, dict[str, Any] | None, checkpointing.Checkpointer,
                        metrics_log.MetricsLog]:
  """A launch's state, restored from `workdir`'s latest complete checkpoint or made fresh
  (`checkpointing.restore_or_create`), with that checkpoint's extras (None when fresh), the
  checkpointer (`config.keep_checkpoints`, `config.checkpoint_every`) and the metrics log,
  continued from the restored step (host 0 writes it)."""
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            keep=config["keep_checkpoints"],
                                            every=config["checkpoint_every"])
  state, extras = checkpointing.restore_or_create(checkpointer, init_state, create_state,
                                                  shardings)
  tqdm.tqdm.write("starting from scratch" if extras is None
                  else f"resumed from step {int(state.step)}")
  log = metrics_log.MetricsLog(os.path.join(workdir, "metrics.jsonl"),
                               resume_step=None if extras is None else int(state.step),
                               enabled=jax.process_index() == 0)
  return state, extras, checkpointer, log
