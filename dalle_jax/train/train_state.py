"""The state both stages train: parameters, optimiser state, EMA, step, RNG, and the update rule.

A step whose loss or gradient is not finite leaves parameters, optimiser state and EMA untouched
and counts itself in `nonfinite_steps`; the launch script decides to stop (keeping its last good
checkpoint) or to go on. The randomness of step t is `fold_in(rng, t)`, so a resumed run draws
exactly what an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32[]
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array           # uint32[2]: raw key data, so checkpoints hold plain arrays
  nonfinite_steps: jax.Array  # int32[]: steps skipped for a non-finite loss or gradient


def create(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """Step 0: the optimiser initialised on `params`, the EMA equal to them."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), ema_params=jax.tree.map(jnp.copy, params),
                    rng=jax.random.key_data(rng), nonfinite_steps=jnp.zeros((), jnp.int32))


def step_rng(state: TrainState) -> jax.Array:
  """The PRNG key of the current step."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def apply_gradients(state: TrainState, grads: Any, loss: jax.Array,
                    optimizer: optax.GradientTransformation, ema_decay: float,
                    frozen: Any | None = None, **extra_args: Any
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser update and EMA step, skipped (but counted) if loss or gradient is not finite.

  `frozen`: None, or a tree of bool[] like `state.params`; a True leaf is not updated (neither
  Adam's momentum nor weight decay moves it). `extra_args` go to `optimizer.update` (e.g.
  `value=loss` for reduce-on-plateau).
  """
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra_args)
  if frozen is not None:
    updates = jax.tree.map(lambda u, f: jnp.where(f, jnp.zeros_like(u), u), updates, frozen)
  params = optax.apply_updates(state.params, updates)
  ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema_params, params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                            opt_state=keep(opt_state, state.opt_state),
                            ema_params=keep(ema, state.ema_params),
                            nonfinite_steps=state.nonfinite_steps + 1 - finite.astype(jnp.int32))
  return new_state, {"grad_norm": grad_norm, "nonfinite": 1 - finite.astype(jnp.int32)}


class NonfiniteWatch:
  """The launch scripts' side of skipped steps: stop at the first new one, or count them."""

  def __init__(self, state: TrainState, on_nonfinite: str):
    self.seen = int(state.nonfinite_steps)
    self.stop = on_nonfinite == "stop"

  def check(self, state: TrainState, step: int, last_good_step: int | None) -> int:
    """The count of skipped steps so far; raises if a new one came and the policy is "stop"."""
    count = int(state.nonfinite_steps)
    if count > self.seen and self.stop:
      raise FloatingPointError(
          f"non-finite loss or gradient at or before step {step}; stopping with the last good "
          f"checkpoint (step {last_good_step}) kept. Lower the learning rate, or set "
          "--config.train.on_nonfinite=skip to skip such steps and count them.")
    self.seen = count
    return count
