"""What every training launch shares: the huge-page malloc on CPU, multi-host start-up and the
run directory: its lock, the config check on resume, the restore, image snapshots and how a stage
runs as a child."""

from __future__ import annotations

import dataclasses
import glob
import os
import platform
import signal
import subprocess
import sys
import types
import typing
from typing import Any, Callable, Mapping

from absl import app
from etils import epath
import jax
from ml_collections import config_dict
import tqdm

from dalle_jax.train import checkpointing, metrics_log, run_config, workdir_lock


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


HUGEPAGES_SWITCH = "DALLE_JAX_HUGEPAGES"  # "0": no restart onto huge pages
_RESTARTED = "DALLE_JAX_HUGEPAGES_RESTARTED"  # set in the restarted process: never a second time


def _runs_on_cpu() -> bool:
  """Whether JAX will compute on the CPU, told without starting a backend (a TPU runtime takes
  its chips when it starts, and this process may be about to be replaced): JAX_PLATFORMS if
  set, else whether the machine has no TPU (/dev/accel*, /dev/vfio/<n>) or NVIDIA GPU."""
  platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(",")[0] == "cpu"
  return not any(glob.glob(pattern) for pattern in ("/dev/accel*", "/dev/vfio/[0-9]*",
                                                    "/dev/nvidia[0-9]*"))


def restart_with_hugepages() -> None:
  """Re-runs this process, with its interpreter options and arguments, under HUGEPAGES_TUNABLE
  (glibc reads it only at start-up); returns instead when the tunable is already set, when
  DALLE_JAX_HUGEPAGES=0, off glibc Linux, when JAX will not compute on the CPU, or in a process
  this function already restarted."""
  if (os.environ.get(HUGEPAGES_SWITCH) == "0" or os.environ.get(_RESTARTED)
      or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc"
      or not _runs_on_cpu()):
    return
  env = hugepages_env(os.environ)
  if env == dict(os.environ):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv keeps `-m module`, `-c code` and -X options, which sys.argv loses.
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], dict(env, **{_RESTARTED: "1"}))


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


REFUSALS = (workdir_lock.WorkdirLocked, run_config.ConfigMismatch, checkpointing.CheckpointError)


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` on huge pages (`restart_with_hugepages`), with a refusal of the run
  directory shown as its message and status 1."""
  restart_with_hugepages()
  try:
    app.run(main)
  except REFUSALS as error:
    sys.exit(f"{os.path.basename(sys.argv[0])}: {error}")


def _has_checkpoint(workdir: epath.Path) -> bool:
  directory = workdir / "checkpoints"
  return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())


def prepare_workdir(workdir: str | os.PathLike, config: Mapping[str, Any]) -> None:
  """Claims the run directory before anything is written into it: host 0 takes its lock
  (`workdir_lock`), and a run with checkpoints refuses a config that differs from its saved one
  in fields that must match (`run_config`). The config is written by `open_run`, once restored."""
  workdir = epath.Path(workdir)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lock.WorkdirLock(workdir).acquire()
  saved = run_config.read_saved(workdir)
  if saved is not None and _has_checkpoint(workdir):
    run_config.check_resumable(workdir, saved, config)


def open_run(workdir: str | os.PathLike, config: Mapping[str, Any],
             init_state: Callable[[jax.Array], Any], create_state: Callable[[], Any],
             shardings: Any) -> tuple[Any, dict[str, Any] | None, checkpointing.Checkpointer,
                                      metrics_log.MetricsLog]:
  """A launch's state, restored from `workdir`'s newest checkpoint that restores or made fresh
  (`checkpointing.restore_or_create`), with that checkpoint's extras (None when fresh), the
  checkpointer (`config.keep_checkpoints`, `config.checkpoint_every`) and the metrics log,
  continued from the restored step (host 0 writes it). Then host 0 writes config.json and records
  the fields a resumed run changed in config_history.jsonl."""
  workdir = epath.Path(workdir)
  checkpointer = checkpointing.Checkpointer(workdir / "checkpoints",
                                            keep=config["keep_checkpoints"],
                                            every=config["checkpoint_every"])
  state, extras = checkpointing.restore_or_create(checkpointer, init_state, create_state,
                                                  shardings, report=tqdm.tqdm.write)
  step = None if extras is None else int(state.step)
  tqdm.tqdm.write("starting from scratch" if step is None else f"resumed from step {step}")
  plain = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  if jax.process_index() == 0:
    saved = run_config.read_saved(workdir) if step is not None else None
    changes = run_config.differences(saved, plain) if saved else {}
    for name, (old, new) in changes.items():
      tqdm.tqdm.write(f"resumed with {name} {old!r} -> {new!r} (recorded in "
                      f"{run_config.HISTORY_NAME})")
    run_config.write(workdir, plain, step, changes)
  log = metrics_log.MetricsLog(workdir / "metrics.jsonl", resume_step=step,
                               enabled=jax.process_index() == 0)
  return state, extras, checkpointer, log


def save_snapshot(image: Any, directory: str | os.PathLike, step: int, keep: int) -> None:
  """Writes the PIL `image` as `directory/step_<step>.png` (host 0) and removes all but the
  newest `keep` of them (every one kept when `keep` is 0)."""
  if jax.process_index() != 0:
    return
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  with (directory / f"step_{step}.png").open("wb") as f:
    image.save(f, format="PNG")
  steps = sorted(int(p.stem[5:]) for p in directory.glob("step_*.png") if p.stem[5:].isdigit())
  for old in steps[:-keep] if keep > 0 else []:
    (directory / f"step_{old}.png").unlink(missing_ok=True)


def snapshots_to_keep(config: Mapping[str, Any]) -> int:
  """`config.keep_snapshots` if set (0: every one), else as many as checkpoints are kept."""
  return config.get("keep_snapshots", config["keep_checkpoints"])


def run_stage(command: list[str], env: Mapping[str, str] | None = None) -> None:
  """Runs a stage's script as a child and waits; SIGTERM or SIGINT sent to this process reaches
  the child once (it saves and exits), and this process then exits with the child's status."""
  child = subprocess.Popen(command, env=env, start_new_session=True)  # a terminal's ^C: once
  received = []

  def forward(number, frame):
    del frame
    received.append(number)
    child.send_signal(number)

  previous = {kind: signal.signal(kind, forward) for kind in (signal.SIGTERM, signal.SIGINT)}
  try:
    status = child.wait()
  finally:
    for kind, handler in previous.items():
      signal.signal(kind, handler)
  if received and status:  # the child said why (a trainer: where it stopped)
    sys.exit(status if status > 0 else 128 + received[0])
  if status:
    raise subprocess.CalledProcessError(status, command)
