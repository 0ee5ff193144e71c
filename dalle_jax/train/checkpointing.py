"""Checkpoints of a training run: orbax `CheckpointManager` for the (sharded) state plus JSON extras.

Each step directory holds `state` (the train-state pytree, written by every host for its shards) and
`extras` (JSON, one file per host: its data iterator's position and skip counts). Saves are
asynchronous and atomic: orbax writes into a temporary directory and renames it when complete, so a
run killed at any moment resumes from the last complete checkpoint and never sees a partial one;
the temporary directories such a kill leaves are removed when the next run starts. A checkpoint
that cannot be restored (truncated, a file missing) is reported in one line and the one before it
is tried. A save that finds too little disk space stops the run at that save, with the previous
checkpoint intact.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
from typing import Any, Callable

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """No checkpoint of a run can be restored, or one cannot be written."""


class HostJsonHandler(ocp.CheckpointHandler):
  """Each host's own JSON (its data iterator's position) as `process_<i>-of-<n>.json`.

  Orbax's JsonSave writes from the primary host only; on several hosts each needs its own.
  """

  @staticmethod
  def _file(directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "HostJsonSave") -> None:
    self._file(directory).write_text(json.dumps(args.item))

  def restore(self, directory: epath.Path, args: "HostJsonRestore | None" = None) -> Any:
    del args
    path = self._file(directory)
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise FileNotFoundError(f"{path} is missing (found {found}): a checkpoint restores on the "
                              "number of processes that wrote it")
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(HostJsonHandler, for_save=True)
@dataclasses.dataclass
class HostJsonSave(ocp.args.CheckpointArgs):
  item: dict[str, Any]


@ocp.args.register_with_handler(HostJsonHandler, for_restore=True)
@dataclasses.dataclass
class HostJsonRestore(ocp.args.CheckpointArgs):
  pass


class Checkpointer:
  """Saves every `every` steps (and when forced), keeps the last `keep`, restores the latest."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, every: int = 1000,
               asynchronous: bool = True, writer: bool = True):
    """`writer=False` reads only: it neither creates the directory nor removes the temporary
    directories of a run that may be saving there now."""
    self.directory = epath.Path(directory)
    if "://" not in os.fspath(directory):
      self.directory = self.directory.absolute()
    self.every = every
    self._pending: int | None = None  # the step of the save in flight
    self._reported = False
    self._needed = 0  # bytes one checkpoint takes on disk, as estimated at the last save
    _quiet_async_save_failures()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=asynchronous,
        create=writer)
    if writer and jax.process_index() == 0 and self.directory.exists():
      # A killed save's leftovers (orbax's own clean-up runs in the background, unawaited).
      for orphan in self.directory.glob("*.orbax-checkpoint-tmp*"):
        orphan.rmtree()
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "extras"))
    atexit.register(self.close)  # an exception elsewhere must not leave its threads running

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, extras: dict[str, Any], *, force: bool = False) -> bool:
    """Starts saving `state` and this host's JSON `extras` at `step` if due (or forced).

    Raises CheckpointError, naming the directory and the space needed, when the disk cannot
    hold it (checked before writing) or when the save before it failed for want of space.
    """
    if not force and (self.every <= 0 or step % self.every):
      return False
    self._check_space(step, state)
    with self._reporting():  # a failure of the save before this one names that save's step
      self._manager.wait_until_finished()
    with self._reporting():
      self._pending = step
      return self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), extras=HostJsonSave(extras)), force=force)

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
        state=ocp.args.StandardRestore(abstract_state), extras=HostJsonRestore()))
    return restored["state"], restored["extras"]

  def restore_state(self, abstract_state: Any, step: int) -> Any:
    """The state alone at `step` (readers of a finished run need no data position)."""
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]

  def wait(self):
    """Blocks until pending asynchronous saves are on disk."""
    with self._reporting():
      self._manager.wait_until_finished()
    self._pending = None

  def close(self):
    if self._manager is not None:
      manager, self._manager = self._manager, None
      try:
        manager.close()
      except Exception:  # noqa: BLE001
        if not self._reported:  # a failed save already said why, once
          raise

  def _check_space(self, step: int, state: Any) -> None:
    """Refuses a save the disk cannot hold: as big as the newest checkpoint on disk, or before
    the first one, as the state's arrays."""
    if "://" in os.fspath(self.directory):
      return  # object stores report no free space
    # orbax lists a step while it is still being written: measure the newest one on disk.
    written = [self.directory / str(s) for s in self.all_steps()]
    written = [p for p in written if p.exists()]
    self._needed = (_disk_size(written[-1]) if written else 0) or sum(
        x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    free = shutil.disk_usage(self.directory).free
    if free < self._needed:
      raise CheckpointError(self._disk_full(step, f"{free / 2**20:.1f} MiB free"))

  def _disk_full(self, step: int, detail: str) -> str:
    size = f"about {self._needed / 2**20:.1f} MiB"
    kept = max((s for s in self.all_steps() if s != step and (self.directory / str(s)).exists()),
               default=None)
    return (f"the checkpoint at step {step} cannot be written: {self.directory} is out of space "
            f"({detail}); one checkpoint needs {size}. "
            + (f"The previous checkpoint (step {kept}) is intact and the run resumes from it. "
               if kept is not None else "No earlier checkpoint exists. ")
            + "Free space there (or lower keep_checkpoints, or pass another --workdir) and run the "
            "same command again.")

  @contextlib.contextmanager
  def _reporting(self):
    """Turns an out-of-space failure (of this save or of the asynchronous one before it) into
    CheckpointError naming the step; other errors pass unchanged."""
    try:
      yield
    except Exception as error:
      if not _out_of_space(error):
        raise
      step, self._pending, self._reported = self._pending, None, True
      raise CheckpointError(self._disk_full(step, _first_line(error))) from None


def _disk_size(path: epath.Path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


class _DropAsyncSaveTraceback(logging.Filter):
  """Orbax logs a failed background save with its whole traceback from several threads;
  `Checkpointer` reports it in one paragraph at the next save or wait."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


def _quiet_async_save_failures() -> None:
  logger = logging.getLogger("absl")
  if any(isinstance(f, _DropAsyncSaveTraceback) for f in logger.filters):
    return
  logger.addFilter(_DropAsyncSaveTraceback())
  # Tensorstore's callbacks into the event loop of a failed save print one traceback each.
  previous = sys.excepthook

  def hook(kind, error, trace):
    if not (kind is RuntimeError and str(error) == "Event loop is closed"):
      previous(kind, error, trace)

  sys.excepthook = hook


def _out_of_space(error: BaseException) -> bool:
  while error is not None:
    if (isinstance(error, OSError) and error.errno == 28) or "No space left" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` with the given shardings, the target of `Checkpointer.restore`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _everywhere(ok: bool) -> bool:
  """True if `ok` on every process (a checkpoint that fails on one host fails on all)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.int32(ok)).min())


def restore_or_create(checkpointer: Checkpointer, init_state: Callable[[jax.Array], Any],
                      create_state: Callable[[], Any], shardings: Any,
                      report: Callable[[str], None] = print
                      ) -> tuple[Any, dict[str, Any] | None]:
  """A launch's start: the newest checkpoint that restores, as (state, extras), else (fresh state,
  None) when there is none. A checkpoint that fails is reported in one line and the one before it
  is tried; when every one fails, CheckpointError.

  `init_state(rng)` is traced for shapes only (nothing allocated): it says what to restore into,
  laid out by `shardings`. `create_state()` makes the fresh state directly into its shards.
  """
  steps = checkpointer.all_steps()
  if not steps:
    return create_state(), None
  abstract = abstract_like(jax.eval_shape(init_state, jax.random.key(0)), shardings)
  causes = []
  for step in reversed(steps):
    try:
      restored, cause = checkpointer.restore(abstract, step), None
    except Exception as error:  # orbax and tensorstore raise many kinds for a damaged file
      restored, cause = None, _first_line(error)
    if _everywhere(cause is None):
      return restored
    causes.append(f"step {step}: {cause or 'failed on another host'}")
    report(f"checkpoint {step} in {checkpointer.directory} cannot be restored "
           f"({causes[-1].split(': ', 1)[1]}); trying the one before")
  checkpointer.close()
  raise CheckpointError(
      f"no checkpoint in {checkpointer.directory} can be restored ({'; '.join(causes)}). If the "
      "config changed since they were written, resume with the saved config.json; to start "
      "afresh, move that directory away.")


def restore_run(workdir: str | os.PathLike, abstract_state: Any, step: int | None = None) -> Any:
  """The train state of a finished or running launch (`workdir/checkpoints`) on one device.

  `abstract_state`: ShapeDtypeStructs of the state its config.json describes. Raises
  FileNotFoundError without a complete checkpoint, ValueError when it does not match the config.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = abstract_like(abstract_state, jax.tree.map(lambda _: device, abstract_state))
  checkpointer = Checkpointer(epath.Path(workdir) / "checkpoints", writer=False)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {workdir}/checkpoints")
    return checkpointer.restore_state(target, step)
  except (ValueError, KeyError, TypeError) as error:
    raise ValueError(f"the checkpoint in {workdir} does not match its config.json: {error}; "
                     "pass the workdir of the run that wrote it") from error
  finally:
    checkpointer.close()


def read_run_config(workdir: str | os.PathLike, script: str) -> dict[str, Any]:
  """The config.json a launch script wrote into its workdir."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a {script} workdir?")
  return json.loads(path.read_text())


def restore_items(workdir: str | os.PathLike, abstract_items: dict[str, Any],
                  step: int | None = None) -> dict[str, Any]:
  """Only the named top-level items of a launch's saved state (e.g. `{"ema_params": tree}`), each
  leaf placed on its ShapeDtypeStruct's sharding: an orbax partial restore, which reads nothing
  else (not the optimiser's moments, twice the parameters' size).

  Raises FileNotFoundError without a complete checkpoint, ValueError when the items do not match.
  """
  checkpointer = Checkpointer(epath.Path(workdir) / "checkpoints", writer=False)
  manager, directory = checkpointer._manager, checkpointer.directory
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
    checkpointer.close()
  return dict(restored["state"])
