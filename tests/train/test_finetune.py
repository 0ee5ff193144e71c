"""dalle_jax/train/finetune.py: a fresh state takes another run's parameters and EMA, nothing else."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import CACHE_ENV, REPO
from dalle_jax import sharding
from dalle_jax.dvae import model as dvae, training as dvae_training
from dalle_jax.rerank import model as rerank, training as rerank_training
from dalle_jax.train import checkpointing, finetune
from dalle_jax.transformer import training as transformer_training
from dalle_jax.transformer.model import TransformerConfig

EXPERIMENTS = os.path.join(REPO,
                           "experiments")


def fresh_state(kind: str, workdir: str, **model_changes):
  """A step-0 state for the config `workdir` was trained with (model fields changed), drawn
  from another seed than the run's."""
  with open(os.path.join(workdir, "config.json")) as f:
    run = json.load(f)
  model_cls, train_cls, init = {
      "transformer": (TransformerConfig, transformer_training.TransformerTrainConfig,
                      transformer_training.init_state),
      "dvae": (dvae.DVAEConfig, dvae_training.DVAETrainConfig, dvae_training.init_state),
      "reranker": (rerank.RerankerConfig, rerank_training.RerankerTrainConfig, rerank_training.init_state),
  }[kind]
  model = dataclasses.replace(model_cls(**run["model"]), **model_changes)
  return init(model, train_cls(**run["train"]), jax.random.key(123))


@pytest.mark.parametrize("kind", ["transformer", "dvae", "reranker"])
def test_parameters_and_ema_come_from_the_run_and_the_rest_is_fresh(tiny_runs, kind):
  fresh = fresh_state(kind, tiny_runs[kind])
  state = finetune.init_from(fresh, tiny_runs[kind])
  source = checkpointing.restore_run(tiny_runs[kind], jax.eval_shape(lambda: fresh))
  assert int(source.step) == 2 and int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, state.params, source.params)
  jax.tree.map(np.testing.assert_array_equal, state.ema_params, source.ema_params)
  # The optimiser as at step 0: zero moments, count 0 (the run's had moved).
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, fresh.opt_state)
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(state.opt_state))
  assert any(np.any(leaf) for leaf in jax.tree.leaves(source.opt_state))
  np.testing.assert_array_equal(state.rng, fresh.rng)
  assert not np.array_equal(jax.tree.leaves(fresh.params)[0], jax.tree.leaves(state.params)[0])


def test_a_sharded_state_keeps_its_shardings(tiny_runs):
  """As a launch on a mesh makes it: every array restored into the shards the fresh state has."""
  with open(os.path.join(tiny_runs["transformer"], "config.json")) as f:
    run = json.load(f)
  model = TransformerConfig(**run["model"])
  train = transformer_training.TransformerTrainConfig(**run["train"])
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  shardings = transformer_training.state_shardings(model, train, mesh)
  fresh = transformer_training.create_sharded_state(model, train, mesh, shardings)
  state = finetune.init_from(fresh, tiny_runs["transformer"])
  source = checkpointing.restore_run(tiny_runs["transformer"], jax.eval_shape(lambda: fresh))
  for got, want, placed in zip(jax.tree.leaves(state.params), jax.tree.leaves(source.params),
                               jax.tree.leaves(shardings.params)):
    assert got.sharding == placed
    np.testing.assert_array_equal(got, want)
  assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings.params))


def test_a_shape_mismatch_names_the_parameter(tiny_runs):
  wider = fresh_state("transformer", tiny_runs["transformer"], width=64)
  with pytest.raises(ValueError, match=r"parameter block_0/attention/out/bias is \(32,\) there, "
                     r"\(64,\) in this config"):
    finetune.init_from(wider, tiny_runs["transformer"])
  deeper = fresh_state("transformer", tiny_runs["transformer"], depth=5)
  with pytest.raises(ValueError, match="has no parameter block_4/"):
    finetune.init_from(deeper, tiny_runs["transformer"])
  shallower = fresh_state("transformer", tiny_runs["transformer"], depth=3)
  with pytest.raises(ValueError, match="has parameter block_3/.* that this config's model lacks"):
    finetune.init_from(shallower, tiny_runs["transformer"])
  with pytest.raises(ValueError, match="has no parameter"):  # a run of another stage
    finetune.init_from(fresh_state("transformer", tiny_runs["transformer"]), tiny_runs["dvae"])


def test_a_workdir_without_a_checkpoint_is_refused(tiny_runs, tmp_path):
  fresh = fresh_state("dvae", tiny_runs["dvae"])
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    finetune.init_from(fresh, str(tmp_path))


def test_train_dvae_starts_from_the_run(tiny_runs, tmp_path):
  """One step at learning rate 0: the parameters stay the run's, the EMA moves towards them."""
  workdir = tmp_path / "finetuned"
  subprocess.run(
      [sys.executable, os.path.join(EXPERIMENTS, "train_dvae.py"),
       f"--config={EXPERIMENTS}/configs/dvae_tiny.py", f"--workdir={workdir}",
       f"--config.init_from={tiny_runs['dvae']}", "--config.train.num_steps=1",
       "--config.train.learning_rate=0", "--config.train.final_learning_rate=0",
       "--config.data.eval_split="],
      env={**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu"}, check=True, capture_output=True)
  abstract = jax.eval_shape(lambda: fresh_state("dvae", tiny_runs["dvae"]))
  source = checkpointing.restore_run(tiny_runs["dvae"], abstract)
  tuned = checkpointing.restore_run(str(workdir), abstract)
  assert int(tuned.step) == 1
  jax.tree.map(np.testing.assert_array_equal, tuned.params, source.params)
  decay = 0.9  # dvae_tiny's ema_decay
  jax.tree.map(lambda got, ema, p: np.testing.assert_allclose(got, decay * ema + (1 - decay) * p,
                                                              rtol=1e-5, atol=1e-7),
               tuned.ema_params, source.ema_params, source.params)
