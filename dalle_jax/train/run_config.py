"""Resuming a run under a config: which fields may change and which must equal the saved ones.

Fields that shape the model, the optimiser's state or the data must match `workdir/config.json`:
a checkpoint continued under others would fail to restore, or worse, continue silently as another
experiment. The fields in `MAY_CHANGE` (run length, learning-rate schedule, intervals, mesh and
sharding, evaluation) may change; each change is appended to `workdir/config_history.jsonl`.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Mapping

from etils import epath

CONFIG_NAME = "config.json"
HISTORY_NAME = "config_history.jsonl"

# Dotted names (a section name covers all its fields).
MAY_CHANGE = frozenset({
    "log_every", "image_every", "eval_every", "sample_every", "sample_captions",
    "checkpoint_every", "keep_checkpoints", "keep_snapshots",
    "init_from",  # read only when a run starts fresh
    "mesh",  # checkpoints restore onto any mesh
    # Placement only: checkpoints restore onto any sharding, so a resumed run may place its
    # state otherwise (the transformer's logical axis rules, the dVAE's and reranker's section).
    "sharding_rules", "sharding",
    "train.num_steps", "train.learning_rate", "train.final_learning_rate", "train.warmup_steps",
    "train.lr_warmup_steps", "train.lr_decay_steps", "train.plateau_patience",
    "train.grad_accum_steps", "train.clip_norm", "train.on_nonfinite",
    "data.num_workers", "data.eval_split", "data.eval_batches", "data.eval_codes_dir",
    "data.dvae_workdir",
})


class ConfigMismatch(ValueError):
  """The config differs from the run's saved one in fields that must match."""


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"train": {"seed": 0}} -> {"train.seed": 0}."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return flat


def may_change(name: str) -> bool:
  parts = name.split(".")
  return any(".".join(parts[:n]) in MAY_CHANGE for n in range(1, len(parts) + 1))


def read_saved(workdir: str | epath.Path) -> dict[str, Any] | None:
  path = epath.Path(workdir) / CONFIG_NAME
  return json.loads(path.read_text()) if path.exists() else None


def differences(saved: Mapping[str, Any], new: Mapping[str, Any]
                ) -> dict[str, tuple[Any, Any]]:
  """{field: (saved value, new value)} for every field that differs (absent: the string "-")."""
  # Through JSON, as saved: tuples become lists, placeholders None.
  old, now = flatten(saved), flatten(json.loads(json.dumps(new)))
  return {name: (old.get(name, "-"), now.get(name, "-")) for name in sorted(set(old) | set(now))
          if old.get(name, "-") != now.get(name, "-")}


def check_resumable(workdir: str | epath.Path, saved: Mapping[str, Any],
                    new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """The allowed changes of `new` against `saved`; raises ConfigMismatch naming every field that
  must match and does not."""
  changes = differences(saved, new)
  refused = {k: v for k, v in changes.items() if not may_change(k)}
  if refused:
    lines = "\n".join(f"  {name}: saved {old!r}, now {value!r}"
                      for name, (old, value) in refused.items())
    flags = " ".join(f"--config.{name}={old}" for name, (old, _) in refused.items()
                     if old != "-")
    raise ConfigMismatch(
        f"{workdir} holds a run whose config differs in fields that shape the model or the "
        f"data:\n{lines}\nIts checkpoints cannot continue under these. Resume with the saved "
        f"values ({flags or 'see ' + str(epath.Path(workdir) / CONFIG_NAME)}), or start the new "
        "config in another --workdir. Nothing in the workdir was changed.")
  return {k: v for k, v in changes.items() if may_change(k)}


def write(workdir: str | epath.Path, config: Mapping[str, Any], step: int | None,
          changes: Mapping[str, tuple[Any, Any]]) -> None:
  """Writes config.json and, when a resumed run changed fields, a line of config_history.jsonl."""
  workdir = epath.Path(workdir)
  (workdir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
  if changes:
    record = {"step": step, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "changes": {k: list(v) for k, v in changes.items()}}
    history = workdir / HISTORY_NAME
    previous = history.read_text() if history.exists() else ""  # object stores cannot append
    history.write_text(previous + json.dumps(record) + "\n")
