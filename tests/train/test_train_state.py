"""dalle_jax/train/train_state.py on a two-leaf model with plain SGD: step 0, one update and its
EMA in numbers, a frozen leaf, a non-finite step skipped and counted, and the stop/skip policy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dalle_jax.train import train_state

SGD = optax.sgd(0.5)
PARAMS = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(4.0)}
GRADS = {"w": jnp.array([2.0, -2.0]), "b": jnp.array(1.0)}


def _state():
  return train_state.create(PARAMS, SGD, jax.random.key(0))


def test_step_zero_holds_the_parameters_twice_and_plain_key_data():
  state = _state()
  assert int(state.step) == 0 and int(state.nonfinite_steps) == 0
  assert state.rng.dtype == jnp.uint32 and state.rng.shape == (2,)
  jax.tree.map(np.testing.assert_array_equal, state.ema_params, PARAMS)
  # The step's key is a function of the step: a resumed run draws what an uninterrupted one would.
  later = state.replace(step=state.step + 1)
  assert not np.array_equal(jax.random.key_data(train_state.step_rng(state)),
                            jax.random.key_data(train_state.step_rng(later)))
  np.testing.assert_array_equal(jax.random.key_data(train_state.step_rng(later)),
                                jax.random.key_data(train_state.step_rng(_state().replace(
                                    step=jnp.int32(1)))))


def test_an_update_moves_the_parameters_and_the_ema_by_the_numbers():
  state, metrics = train_state.apply_gradients(_state(), GRADS, jnp.float32(1.0), SGD, 0.75)
  np.testing.assert_allclose(state.params["w"], [0.0, 3.0])  # 1 - 0.5 * 2, 2 + 0.5 * 2
  np.testing.assert_allclose(state.params["b"], 3.5)
  np.testing.assert_allclose(state.ema_params["w"], [0.75, 2.25])  # 0.75 * old + 0.25 * new
  np.testing.assert_allclose(metrics["grad_norm"], 3.0)  # sqrt(4 + 4 + 1)
  assert int(state.step) == 1 and int(metrics["nonfinite"]) == 0
  frozen = {"w": jnp.array(True), "b": jnp.array(False)}
  state, _ = train_state.apply_gradients(_state(), GRADS, jnp.float32(1.0), SGD, 0.75, frozen)
  np.testing.assert_array_equal(state.params["w"], PARAMS["w"])
  np.testing.assert_allclose(state.params["b"], 3.5)


@pytest.mark.parametrize("loss, grads", [
    (jnp.float32(jnp.nan), GRADS), (jnp.float32(1.0), {**GRADS, "b": jnp.array(jnp.inf)})])
def test_a_non_finite_step_changes_nothing_but_the_counts(loss, grads):
  before = _state()
  after, metrics = jax.jit(lambda s, g, l: train_state.apply_gradients(s, g, l, SGD, 0.75))(
      before, grads, loss)
  assert int(after.step) == 1 and int(after.nonfinite_steps) == 1 and int(metrics["nonfinite"])
  for name in ("params", "ema_params", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))


def test_the_watch_stops_at_a_new_skipped_step_or_counts_it():
  state = _state()
  skipped = state.replace(nonfinite_steps=jnp.int32(2))
  skip = train_state.NonfiniteWatch(state, "skip")
  assert skip.check(state, 10, 10) == 0 and skip.check(skipped, 20, 10) == 2
  stop = train_state.NonfiniteWatch(state, "stop")
  assert stop.check(state, 10, 10) == 0
  with pytest.raises(FloatingPointError, match=r"at or before step 20; .*\(step 10\) kept.*"
                                               r"on_nonfinite=skip"):
    stop.check(skipped, 20, 10)
  # A run resumed after skips it already counted stops only at a new one.
  assert train_state.NonfiniteWatch(skipped, "stop").check(skipped, 30, 20) == 2
