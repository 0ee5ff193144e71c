"""experiments/configs: every config builds its stage's dataclasses with every training field set,
derived configs change only what they say over the config they import, and the launch scripts
load a derived config from any working directory."""

import dataclasses
import glob
import importlib
import os
import subprocess
import sys

import pytest

from dalle_jax.dvae import model as dvae, training as dvae_training
from dalle_jax.rerank import model as rerank, training as rerank_training
from dalle_jax.transformer import model as transformer, training as transformer_training
from conftest import REPO

NAMES = sorted(os.path.basename(p)[:-3]
               for p in glob.glob(os.path.join(REPO, "experiments", "configs", "*.py")))
# A config's stage (its name's first word) -> its model and training dataclasses.
CLASSES = {"dvae": (dvae.DVAEConfig, dvae_training.DVAETrainConfig),
           "transformer": (transformer.TransformerConfig,
                           transformer_training.TransformerTrainConfig),
           "reranker": (rerank.RerankerConfig, rerank_training.RerankerTrainConfig)}
# Derived config -> (the config it imports, the fields it changes).
DERIVED = {
    "dvae_emoji64": ("dvae_shapes", {"model.resolution", "train.num_steps",
                                     "train.final_learning_rate", "train.schedule_scale",
                                     "data.dataset", "data.num_examples", "data.eval_batches",
                                     "keep_checkpoints"}),
    "dvae_emoji32": ("dvae_emoji64", {"model.resolution", "train.num_steps",
                                      "train.schedule_scale", "keep_checkpoints"}),
    "transformer_emoji32": ("transformer_small", {"model.text_vocab_size", "model.dropout",
                                                  "train.num_steps"}),
    "transformer_shapes": ("transformer_small", {"model.width", "model.head_dim",
                                                 "model.layer_kinds", "model.text_loss_weight",
                                                 "train.num_steps", "train.learning_rate",
                                                 "train.caption_dropout", "sample_every"}),
    "reranker_emoji32": ("reranker_small", {"model.resolution", "model.patch_size",
                                            "model.text_vocab_size", "data.dataset",
                                            "data.num_examples"}),
}


def _module(name: str):
  return importlib.import_module(f"experiments.configs.{name}")


def _flat(config) -> dict:
  """A config as {"section.field": value}."""
  flat = {}
  for key, value in config.to_dict().items():
    if isinstance(value, dict):
      flat.update({f"{key}.{k}": v for k, v in value.items()})
    else:
      flat[key] = value
  return flat


@pytest.mark.parametrize("name", NAMES)
def test_every_config_builds_its_dataclasses_with_every_train_field(name):
  config = _module(name).get_config()
  model_cls, train_cls = CLASSES[name.split("_")[0]]
  model_cls(**config.model)
  train_cls(**config.train)
  # Every field present, so that --config.train.<field>=v overrides any of them.
  assert set(config.train) == {f.name for f in dataclasses.fields(train_cls)}
  # The docstring gives the command that runs it.
  assert f"--config=experiments/configs/{name}.py" in _module(name).__doc__


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_derived_configs_import_their_base_and_change_only_what_they_say(name):
  base_name, changed = DERIVED[name]
  module, base = _module(name), _module(base_name)
  assert getattr(module, base_name) is base
  derived, original = _flat(module.get_config()), _flat(base.get_config())
  assert derived.keys() == original.keys()
  assert {k for k in derived if derived[k] != original[k]} == changed


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_a_launch_script_loads_a_derived_config_from_any_directory(cwd, tmp_path):
  # Without the repository on PYTHONPATH: the script itself makes experiments.configs importable.
  path = os.environ.get("PYTHONPATH", "").split(os.pathsep)
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join(p for p in path if p and os.path.abspath(p) != REPO)}
  where = REPO if cwd == "repo" else str(tmp_path)
  prefix = "" if cwd == "repo" else REPO + os.sep
  script = f"{prefix}experiments/train_dvae.py"
  # dvae_emoji32 imports dvae_emoji64 (the script's default), which imports dvae_shapes.
  result = subprocess.run(
      [sys.executable, script, f"--config={prefix}experiments/configs/dvae_emoji32.py",
       "--helpshort"], cwd=where, env=env, capture_output=True, text=True, timeout=120)
  # absl prints the flags and exits 1 after a help flag: by then both configs have loaded.
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "--workdir: Run directory." in result.stdout, result.stdout[-3000:]
