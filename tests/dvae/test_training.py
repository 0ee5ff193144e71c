"""dalle_jax/dvae/training.py: sharded steps equal one device, non-finite steps, a falling loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax import sharding
from dalle_jax.data import make_source, pipeline
from dalle_jax.dvae import model as dvae, training as dvae_training

MODEL = dvae.DVAEConfig(resolution=16, group_count=3, n_hid=16, n_blk_per_group=1, n_init=8,
                        vocab_size=32)
TRAIN = dvae_training.DVAETrainConfig(batch_size=8, learning_rate=3e-3, schedule_scale=1e-3,
                                      ema_decay=0.5)
EVERY_ARRAY = sharding.StateSharding(min_size=0)  # the tiny model's arrays split too


@pytest.fixture(scope="module")
def state():
  # Eager: `dvae.init` inside is compiled once and cached; the optimiser init is trivial.
  return dvae_training.init_state(MODEL, TRAIN, jax.random.key(0))


@pytest.fixture(scope="module")
def one_device():
  """The compiled step on a one-device mesh, shared by the tests below."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  shardings = dvae_training.state_shardings(MODEL, TRAIN, mesh, EVERY_ARRAY)
  return mesh, shardings, dvae_training.make_train_step(MODEL, TRAIN, mesh, shardings)


@pytest.fixture(scope="module")
def batches():
  loader = pipeline.Loader(make_source("shapes", resolution=16, num_examples=64),
                           pipeline.LoaderConfig(resolution=16, batch_size=8, seed=0),
                           process_index=0, process_count=1)
  return [next(loader)["image"] for _ in range(4)]


def _placed(state, shardings):
  """A copy of `state` on `shardings`: the compiled step donates (deletes) its input."""
  return jax.device_put(jax.tree.map(jnp.copy, state), shardings)


def _run(state, batches, mesh, shardings, step):
  state = _placed(state, shardings)
  losses = []
  for images in batches[:2]:
    state, metrics = step(state, jax.device_put(images, sharding.batch_sharding(mesh)))
    losses.append(float(metrics["loss"]))
  return state, losses


def test_sharded_steps_equal_the_single_device_step(state, batches, one_device):
  reference, reference_losses = _run(state, batches, *one_device)
  for shape in ({"data": 2, "fsdp": 4},):
    mesh = sharding.make_mesh(**shape)
    shardings = dvae_training.state_shardings(MODEL, TRAIN, mesh, EVERY_ARRAY)
    step = dvae_training.make_train_step(MODEL, TRAIN, mesh, shardings)
    sharded, losses = _run(state, batches, mesh, shardings, step)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(sharded.params), jax.device_get(reference.params))
    # Placement is what the rule says: the largest axis that the fsdp size divides.
    kernel = shardings.params["encoder"]["group_3_block_1"]["res_path_conv_2"]["w"]  # 3x3x16x16
    assert kernel.spec == jax.sharding.PartitionSpec(None, None, "fsdp", None)
    adam_mu = sharded.opt_state[0].mu["encoder"]["group_3_block_1"]["res_path_conv_2"]["w"]
    assert adam_mu.sharding.spec == kernel.spec  # optimiser state is sharded like its parameter
    assert len(adam_mu.addressable_shards) == 8 and adam_mu.addressable_shards[0].data.shape[2] \
        == 16 // shape["fsdp"]


def test_a_non_finite_step_changes_nothing_but_is_counted(state, batches, one_device):
  broken = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
  _, shardings, step = one_device
  after, metrics = step(_placed(broken, shardings), batches[0])
  assert int(metrics["nonfinite"]) == 1 and int(after.nonfinite_steps) == 1
  assert int(after.step) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), after.opt_state, broken.opt_state)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), after.ema_params,
               broken.ema_params)


def test_the_loss_falls_on_real_batches_and_the_ema_follows(state, batches, one_device):
  _, shardings, step = one_device
  state = _placed(state, shardings)
  losses = []
  for i in range(40):
    state, metrics = step(state, batches[i % len(batches)])
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05
  assert int(state.step) == 40 and int(state.nonfinite_steps) == 0
  # EMA with decay 0.5 sits between the initial and the current parameters, close to current.
  w = lambda tree: tree["decoder"]["output_conv"]["w"]
  assert float(jnp.abs(w(state.ema_params) - w(state.params)).max()) < float(
      jnp.abs(w(state.params)).max())


def test_bad_training_configs_are_refused():
  with pytest.raises(ValueError, match="on_nonfinite"):
    dvae_training.DVAETrainConfig(on_nonfinite="ignore")
  with pytest.raises(ValueError, match="tau_end"):
    dvae_training.DVAETrainConfig(tau_end=2.0)
  with pytest.raises(ValueError, match="decoder_finetune_fraction"):
    dvae_training.DVAETrainConfig(decoder_finetune_fraction=1.0)


def test_the_configs_sharding_section_places_the_state():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  kernel = lambda tree: tree.params["encoder"]["group_3_block_1"]["res_path_conv_2"]["w"]
  split = dvae_training.state_shardings(MODEL, TRAIN, mesh, EVERY_ARRAY)
  assert kernel(split).spec == jax.sharding.PartitionSpec(None, None, "fsdp", None)
  # The default keeps this 2,304-element kernel whole (under 2**14 elements).
  assert kernel(dvae_training.state_shardings(MODEL, TRAIN, mesh)).spec == jax.sharding.PartitionSpec()
  placement = sharding.StateSharding.from_config(dict(mode="replicated", min_size=0))
  state = dvae_training.create_sharded_state(
      MODEL, TRAIN, mesh, dvae_training.state_shardings(MODEL, TRAIN, mesh, placement))
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state))
  with pytest.raises(ValueError, match="'fsdp' or 'replicated'"):
    sharding.StateSharding.from_config(dict(mode="zero3"))
  with pytest.raises(ValueError, match="no field"):
    sharding.StateSharding.from_config(dict(min_sise=0))


def test_the_decoder_only_last_phase_freezes_the_encoder_and_trains_the_decoder(state, batches):
  train = dataclasses.replace(TRAIN, num_steps=4, decoder_finetune_fraction=0.5)
  assert train.finetune_start() == 2
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  shardings = dvae_training.state_shardings(MODEL, train, mesh, EVERY_ARRAY)
  step = dvae_training.make_train_step(MODEL, train, mesh, shardings)
  states = [jax.device_get(state)]
  current = _placed(state, shardings)
  for images in batches:
    current, _ = step(current, images)
    states.append(jax.device_get(current))
  part = lambda s, name: jax.tree.leaves(s.params[name])
  changed = lambda a, b, name: any(np.any(x != y) for x, y in zip(part(a, name), part(b, name)))
  assert changed(states[0], states[2], "encoder")  # steps 0 and 1: the relaxed ELB moves both
  assert not changed(states[2], states[4], "encoder")  # steps 2 and 3: no Adam momentum either
  assert changed(states[2], states[3], "decoder") and changed(states[3], states[4], "decoder")
