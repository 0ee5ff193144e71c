"""`transformer_training.load_trained` over a mesh: only the parameters it uses, split as training
splits them, and sampling across 8 simulated devices draws what one device draws."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax import sharding
from dalle_jax.train import checkpointing
from dalle_jax.transformer import sampling, training as transformer_training
from dalle_jax.transformer.model import TransformerConfig
from dalle_jax.transformer.training import TransformerTrainConfig

MODEL = dict(text_vocab_size=40, text_len=8, image_vocab_size=32, image_size=4, width=32,
             depth=4, heads=4, head_dim=8, conv_kernel=3)
TRAIN = dict(batch_size=8, num_steps=4)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run directory whose checkpoint holds EMA parameters unlike the raw ones, and an
  optimiser state that no config describes: a restore that read it would fail."""
  root = str(tmp_path_factory.mktemp("run"))
  model, train = TransformerConfig(**MODEL), TransformerTrainConfig(**TRAIN)
  state = transformer_training.init_state(model, train, jax.random.key(0))
  ema = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                     state.params)
  state = state.replace(ema_params=ema, opt_state={"not_adam": jnp.arange(3.0)})
  with open(os.path.join(root, "config.json"), "w") as f:
    json.dump({"model": MODEL, "train": TRAIN, "data": {}}, f)
  checkpointer = checkpointing.Checkpointer(os.path.join(root, "checkpoints"),
                                            asynchronous=False)
  checkpointer.save(4, state, {}, force=True)
  checkpointer.close()
  return root, jax.device_get(state)


def test_restores_only_the_chosen_parameters(workdir):
  root, saved = workdir
  for ema, expected in ((True, saved.ema_params), (False, saved.params)):
    model, params, config = transformer_training.load_trained(root, ema=ema)
    assert config["model"] == MODEL
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(np.asarray(got), want)
  # The whole state does not restore: its optimiser state is not what the config makes.
  abstract = jax.eval_shape(lambda: transformer_training.init_state(
      TransformerConfig(**MODEL), TransformerTrainConfig(**TRAIN), jax.random.key(0)))
  with pytest.raises(ValueError):
    checkpointing.restore_run(root, abstract)


def test_sharded_sampling_equals_one_device(workdir):
  root, saved = workdir
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
  model, params, _ = transformer_training.load_trained(root, mesh=mesh)
  qkv = params["block_0"]["attention"]["qkv"]["kernel"]
  # Split as training splits it: the model dimension over fsdp, the heads over tensor.
  assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
  assert qkv.addressable_shards[0].data.shape == (16, 3, 2, 8)
  np.testing.assert_array_equal(np.asarray(qkv),
                                saved.ema_params["block_0"]["attention"]["qkv"]["kernel"])

  batch = 8
  text = jax.random.randint(jax.random.key(2), (batch, model.text_len), 0,
                            model.num_text_tokens)
  keys = jax.random.split(jax.random.key(3), batch)
  prime = jnp.zeros((batch, model.image_size, model.image_size), jnp.int32)
  settings = sampling.SampleSettings(temperature=jnp.float32(1.0), top_k=jnp.int32(0),
                                     top_p=jnp.float32(1.0), guidance=jnp.float32(1.0),
                                     prime_rows=jnp.int32(0))
  sharded = sampling.make_sampler(
      model, None, mesh, param_shardings=transformer_training.param_shardings(model, mesh))
  _, codes = sharded(params, None, text, keys, settings, prime)

  _, one_device_params, _ = transformer_training.load_trained(root)
  _, expected = sampling.make_sampler(model)(one_device_params, None, text, keys, settings,
                                             prime)
  assert codes.sharding.spec == sharding.batch_sharding(mesh).spec
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(expected))
  assert len(np.unique(np.asarray(expected))) > 4  # real draws, not a constant


def test_a_run_loads_with_the_sharding_rules_it_stored(workdir, tmp_path):
  root, _ = workdir
  shutil.copytree(root, tmp_path, dirs_exist_ok=True)
  rules = [[name, None if name == "embed" else axes] for name, axes in sharding.TRANSFORMER_RULES]
  with open(tmp_path / "config.json", "w") as f:  # as JSON stores the tuples: lists
    json.dump({"model": MODEL, "train": TRAIN, "data": {}, "sharding_rules": rules}, f)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
  _, params, _ = transformer_training.load_trained(str(tmp_path), mesh=mesh)
  qkv = params["block_0"]["attention"]["qkv"]["kernel"]
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
