"""Checkpoints of a training run: orbax `CheckpointManager` for the (sharded) state plus JSON extras.

Each step directory holds `state` (the train-state pytree, written by every host for its shards) and
`extras` (JSON: the data iterator's position and skip counts, the config). Saves are asynchronous
and atomic: orbax writes into a temporary directory and renames it when complete, so a run killed
at any moment resumes from the last complete checkpoint and never sees a partial one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every` steps (and when forced), keeps the last `keep`, restores the latest."""

  def __init__(self, directory: str, *, keep: int = 3, every: int = 1000,
               asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=asynchronous,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "extras"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, extras: dict[str, Any], *, force: bool = False) -> bool:
    """Starts saving `state` and the JSON `extras` at `step` if it is due (or forced)."""
    if not force and (self.every <= 0 or step % self.every):
      return False
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extras=ocp.args.JsonSave(extras)), force=force)

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any]] | None:
    """The state at `step` (default latest) laid out as `abstract_state` says, or None if none.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with shardings: the restore places
    each array on that sharding, so a run may resume on a different mesh.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), extras=ocp.args.JsonRestore()))
    return restored["state"], restored["extras"]

  def wait(self):
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` with the given shardings, the target of `Checkpointer.restore`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def restore_or_create(checkpointer: Checkpointer, init_state: Callable[[jax.Array], Any],
                      create_state: Callable[[], Any], shardings: Any
                      ) -> tuple[Any, dict[str, Any] | None]:
  """A launch's start: the latest complete checkpoint's (state, extras), else (fresh state, None).

  `init_state(rng)` is traced for shapes only (nothing allocated): it says what to restore into,
  laid out by `shardings`. `create_state()` makes the fresh state directly into its shards.
  """
  abstract = abstract_like(jax.eval_shape(init_state, jax.random.key(0)), shardings)
  restored = checkpointer.restore(abstract)
  if restored is None:
    return create_state(), None
  return restored


def restore_run(workdir: str, abstract_state: Any, step: int | None = None) -> Any:
  """The train state of a finished or running launch (`workdir/checkpoints`) on one device.

  `abstract_state`: ShapeDtypeStructs of the state its config.json describes. Raises
  FileNotFoundError without a complete checkpoint, ValueError when it does not match the config.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = abstract_like(abstract_state, jax.tree.map(lambda _: device, abstract_state))
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    restored = checkpointer.restore(target, step)
  except (ValueError, KeyError, TypeError) as error:
    raise ValueError(f"the checkpoint in {workdir} does not match its config.json: {error}; "
                     "pass the workdir of the run that wrote it") from error
  finally:
    checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"no complete checkpoint in {workdir}/checkpoints")
  return restored[0]


def read_run_config(workdir: str, script: str) -> dict[str, Any]:
  """The config.json a launch script wrote into its workdir."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a {script} workdir?")
  with open(path) as f:
    return json.load(f)


def restore_items(workdir: str, abstract_items: dict[str, Any], step: int | None = None
                  ) -> dict[str, Any]:
  """Only the named top-level items of a launch's saved state (e.g. `{"ema_params": tree}`), each
  leaf placed on its ShapeDtypeStruct's sharding: an orbax partial restore, which reads nothing
  else (not the optimiser's moments, twice the parameters' size).

  Raises FileNotFoundError without a complete checkpoint, ValueError when the items do not match.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = ocp.CheckpointManager(directory, item_names=("state", "extras"))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {directory}")
    args = ocp.args.PyTreeRestore(
        item=abstract_items, restore_args=ocp.checkpoint_utils.construct_restore_args(
            abstract_items), partial_restore=True)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=args))
    except (ValueError, KeyError, TypeError) as error:
      raise ValueError(f"the checkpoint in {workdir} does not match its config.json: {error}; "
                       "pass the workdir of the run that wrote it") from error
  finally:
    manager.close()
  return dict(restored["state"])
