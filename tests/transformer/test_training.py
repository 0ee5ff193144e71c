"""Tests for dalle_jax/transformer/training.py on 8 simulated CPU devices: the sharded step equals
the single-device step, parameters land where the rules say, checkpoints move between meshes."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dalle_jax import sharding
from dalle_jax.train import checkpointing
from dalle_jax.transformer import training as tt
from dalle_jax.transformer.model import TransformerConfig

MODEL = TransformerConfig(text_vocab_size=56, text_len=8, image_vocab_size=32, image_size=4,
                          width=32, depth=4, heads=4, head_dim=8, conv_kernel=3)
TRAIN = tt.TransformerTrainConfig(batch_size=8, num_steps=50, learning_rate=3e-3,
                                  warmup_steps=5, ema_decay=0.9)


def _batch(seed=0, batch=8):
  rng = np.random.default_rng(seed)
  return {"text": rng.integers(0, MODEL.num_text_tokens, (batch, MODEL.text_len), np.int32),
          "codes": rng.integers(0, MODEL.image_vocab_size, (batch, 4, 4), np.int32)}


def _mesh(data, fsdp, tensor):
  return sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[:data * fsdp * tensor])


def _grads_on(mesh, params, batch):
  shardings = tt.state_shardings(MODEL, TRAIN, mesh)
  grad = jax.jit(jax.value_and_grad(lambda p, b: tt.loss_fn(MODEL, p, b)[0]),
                 in_shardings=(shardings.params, tt.batch_shardings(mesh)),
                 out_shardings=(sharding.replicated(mesh), shardings.params))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.TRANSFORMER_RULES):
    return jax.device_get(grad(params, batch))


@pytest.fixture(scope="module")
def single():
  params = tt.init_state(MODEL, TRAIN, jax.random.key(0)).params
  return jax.device_get(params), _grads_on(_mesh(1, 1, 1), params, _batch())


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1), (1, 2, 4)])
def test_sharded_loss_and_gradients_equal_single_device(single, shape):
  params, (loss, grads) = single
  sharded_loss, sharded_grads = _grads_on(_mesh(*shape), params, _batch())
  np.testing.assert_allclose(sharded_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               sharded_grads, grads)


def test_sharded_train_steps_equal_single_device():
  runs = {}
  for shape in [(1, 1, 1), (2, 2, 2)]:
    mesh = _mesh(*shape)
    shardings = tt.state_shardings(MODEL, TRAIN, mesh)
    state = tt.create_sharded_state(MODEL, TRAIN, mesh, shardings)
    step = tt.make_train_step(MODEL, TRAIN, mesh, shardings)
    losses = []
    for i in range(3):
      state, metrics = step(state, _batch(i))
      losses.append(float(metrics["loss"]))
    runs[shape] = losses, jax.device_get(state.params)
  np.testing.assert_allclose(runs[(2, 2, 2)][0], runs[(1, 1, 1)][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5),
               runs[(2, 2, 2)][1], runs[(1, 1, 1)][1])


def test_placement_follows_the_rules():
  mesh = _mesh(2, 2, 2)
  shardings = tt.state_shardings(MODEL, TRAIN, mesh)
  block = shardings.params["block_0"]
  expected = {
      ("attention", "qkv", "kernel"): P("fsdp", None, "tensor", None),
      ("attention", "qkv", "bias"): P(None, "tensor", None),
      ("attention", "out", "kernel"): P("tensor", None, "fsdp"),
      ("mlp", "wi", "kernel"): P("fsdp", "tensor"),
      ("mlp", "wi", "bias"): P("tensor"),
      ("mlp", "wo", "kernel"): P("tensor", "fsdp"),
      ("ln_1", "scale"): P(None),
  }
  for path, spec in expected.items():
    assert functools.reduce(lambda d, k: d[k], path, block).spec == spec, path
  assert shardings.params["text_embedding"].spec == P(None, "fsdp")
  assert shardings.params["image_head"]["kernel"].spec == P("fsdp", "tensor")
  # The optimiser's moments and the EMA follow their parameters.
  adam = shardings.opt_state[1][0]
  assert adam.mu["block_0"]["mlp"]["wi"]["kernel"].spec == P("fsdp", "tensor")
  assert adam.nu["image_head"]["kernel"].spec == P("fsdp", "tensor")
  assert shardings.ema_params["block_0"]["attention"]["out"]["kernel"].spec == \
      P("tensor", None, "fsdp")
  # And the arrays really are split: each device holds a quarter of an MLP kernel.
  state = tt.create_sharded_state(MODEL, TRAIN, mesh, shardings)
  wi = state.params["block_0"]["mlp"]["wi"]["kernel"]
  assert wi.addressable_shards[0].data.shape == (32 // 2, 128 // 2)
  mu = state.opt_state[1][0].mu["block_0"]["mlp"]["wi"]["kernel"]
  assert mu.addressable_shards[0].data.shape == (16, 64)


def test_the_configs_rules_place_the_state_and_a_bad_table_is_refused():
  mesh = _mesh(2, 2, 2)
  rules = tuple((name, None if name == "embed" else axes)
                for name, axes in sharding.TRANSFORMER_RULES)
  shardings = tt.state_shardings(MODEL, TRAIN, mesh, rules)
  state = tt.create_sharded_state(MODEL, TRAIN, mesh, shardings)
  assert state.params["text_embedding"].sharding.is_fully_replicated  # (vocab, embed): whole
  assert state.params["block_0"]["mlp"]["wi"]["kernel"].sharding.spec == P(None, "tensor")
  assert state.opt_state[1][0].mu["image_head"]["kernel"].sharding.spec == P(None, "tensor")
  typo = (("embed", "fdsp"),) + rules[1:]
  with pytest.raises(ValueError, match="'embed' maps to 'fdsp'"):
    tt.state_shardings(MODEL, TRAIN, mesh, typo)
  with pytest.raises(ValueError, match=r"no rule for vocab: add \('vocab', 'tensor'\)"):
    tt.make_train_step(MODEL, TRAIN, mesh, shardings,
                       [rule for rule in rules if rule[0] != "vocab"])


def test_indivisible_placement_is_refused_before_compiling():
  with pytest.raises(ValueError, match=r"heads|do not split evenly"):
    tt.state_shardings(dataclasses.replace(MODEL, heads=3), TRAIN, _mesh(1, 1, 2))


def test_gradient_accumulation_equals_one_big_batch():
  params = tt.init_state(MODEL, TRAIN, jax.random.key(0)).params
  batch = _batch()
  rng = jax.random.key(1)
  whole = tt._accumulated_grads(MODEL, TRAIN, params, batch, rng)
  accum = dataclasses.replace(TRAIN, grad_accum_steps=4)
  split = jax.jit(functools.partial(tt._accumulated_grads, MODEL, accum))(params, batch, rng)
  np.testing.assert_allclose(split[1]["loss"], whole[1]["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), split[0], whole[0])


def test_caption_dropout_gives_the_empty_caption():
  text = jnp.asarray(_batch()["text"])
  empty = MODEL.text_vocab_size + np.arange(MODEL.text_len)
  dropped = np.asarray(tt.drop_captions(MODEL, text, jax.random.key(0), 0.5))
  is_empty = (dropped == empty).all(1)
  assert 0 < is_empty.sum() < 8
  np.testing.assert_array_equal(dropped[~is_empty], np.asarray(text)[~is_empty])
  np.testing.assert_array_equal(tt.drop_captions(MODEL, text, jax.random.key(0), 0.0), text)


def test_loss_falls_on_a_real_batch():
  mesh = _mesh(1, 1, 1)
  shardings = tt.state_shardings(MODEL, TRAIN, mesh)
  state = tt.create_sharded_state(MODEL, TRAIN, mesh, shardings)
  step = tt.make_train_step(MODEL, TRAIN, mesh, shardings)
  batch = _batch()
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.nonfinite_steps) == 0


def test_plateau_decay_halves_the_step_when_the_loss_stalls():
  train = dataclasses.replace(TRAIN, decay="plateau", plateau_patience=2, warmup_steps=1)
  optimizer = tt.make_optimizer(train)
  params = {"w": jnp.ones((2, 2))}
  state = optimizer.init(params)
  scales = []
  for _ in range(12):
    _, state = optimizer.update({"w": jnp.ones((2, 2))}, state, params, value=jnp.float32(1.0))
    scales.append(float(state[-1].scale))
  assert scales[0] == 1.0 and 0.5 ** 5 <= scales[-1] < 1.0


def test_checkpoint_moves_between_meshes(tmp_path):
  big = _mesh(2, 2, 2)
  shardings = tt.state_shardings(MODEL, TRAIN, big)
  state = tt.create_sharded_state(MODEL, TRAIN, big, shardings)
  state, _ = tt.make_train_step(MODEL, TRAIN, big, shardings)(state, _batch())
  saver = checkpointing.Checkpointer(str(tmp_path), every=1)
  saver.save(1, state, {"data": {"epoch": 0}}, force=True)
  saver.wait()
  saver.close()
  expected = jax.device_get(state)
  abstract = jax.eval_shape(lambda: tt.init_state(MODEL, TRAIN, jax.random.key(0)))
  for shape in [(1, 1, 1), (1, 2, 2)]:
    mesh = _mesh(*shape)
    target = checkpointing.abstract_like(abstract, tt.state_shardings(MODEL, TRAIN, mesh))
    loader = checkpointing.Checkpointer(str(tmp_path))
    restored, extras = loader.restore(target)
    loader.close()
    assert extras == {"data": {"epoch": 0}}
    wi = restored.params["block_0"]["mlp"]["wi"]["kernel"]
    assert wi.sharding.mesh.shape == mesh.shape
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
