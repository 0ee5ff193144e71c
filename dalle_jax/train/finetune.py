"""Fine-tuning: a fresh train state whose parameters and EMA come from another run.

    python experiments/train_transformer.py --config=... --workdir=runs/mine \
        --config.init_from=runs/pretrained

Only `params` and `ema_params` are read, from the other run's latest complete checkpoint; the
step, the optimiser's moments, the RNG and the schedules start fresh. Every parameter must be
there with the same shape, or the error names the first that is not.
"""

from __future__ import annotations

import os
from typing import Any

from etils import epath
import jax
import orbax.checkpoint as ocp

from dalle_jax.train import train_state

_RESTORED = ("params", "ema_params")


def _names(tree: Any) -> dict[str, Any]:
  """{"block_0/attention/out/kernel": leaf} of a nested dict of parameters."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def latest_state_dir(workdir: str) -> str:
  """The `state` item of `workdir`'s latest complete checkpoint."""
  directory = epath.Path(workdir) / "checkpoints"
  if "://" not in os.fspath(directory):  # a local path; gs:// and the like stay as they are
    directory = directory.absolute()
  step = None
  if directory.is_dir():
    manager = ocp.CheckpointManager(directory,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    manager.close()
  if step is None:
    raise FileNotFoundError(f"init_from={workdir!r}: no complete checkpoint in {directory}; "
                            "give the workdir of a run that saved one")
  return os.fspath(directory / str(step) / "state")


def check_shapes(target: Any, source: Any, workdir: str) -> None:
  """Raises ValueError naming the first parameter of `target` that `source` lacks or holds in
  another shape, or that `source` has and `target` does not (both: pytrees with `.shape`)."""
  want, have = _names(target), _names(source)
  for name, leaf in want.items():
    if name not in have:
      raise ValueError(f"init_from={workdir!r} has no parameter {name}: it is a run of another "
                       "model; start from a run of this architecture")
    if tuple(have[name].shape) != tuple(leaf.shape):
      raise ValueError(f"init_from={workdir!r}: parameter {name} is {tuple(have[name].shape)} "
                       f"there, {tuple(leaf.shape)} in this config; set the model fields to the "
                       "other run's (its config.json)")
  extra = sorted(set(have) - set(want))
  if extra:
    raise ValueError(f"init_from={workdir!r} has parameter {extra[0]} that this config's model "
                     "lacks; set the model fields to the other run's (its config.json)")


def init_from(state: train_state.TrainState, workdir: str) -> train_state.TrainState:
  """`state` (fresh, possibly sharded) with `params` and `ema_params` read from `workdir`,
  each array placed on the sharding it has in `state`; everything else unchanged."""
  path = latest_state_dir(workdir)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    stored = checkpointer.metadata(path).item_metadata
    target = {}
    for name in _RESTORED:
      if name not in stored:
        raise ValueError(f"init_from={workdir!r}: its checkpoint holds no {name}; give the "
                         "workdir of a train_*.py run")
      check_shapes(getattr(state, name), stored[name], workdir)
      target[name] = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
          getattr(state, name))
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  return state.replace(**{name: restored[name] for name in _RESTORED})
