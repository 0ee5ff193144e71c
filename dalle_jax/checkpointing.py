"""Checkpoints of a training run: orbax `CheckpointManager` for the (sharded) state plus JSON extras.

Each step directory holds `state` (the train-state pytree, written by every host for its shards) and
`extras` (JSON: the data iterator's position and skip counts, the config). Saves are asynchronous
and atomic: orbax writes into a temporary directory and renames it when complete, so a run killed
at any moment resumes from the last complete checkpoint and never sees a partial one.
"""

from __future__ import annotations

import os
from typing import Any

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
