"""Step -> value schedules (optax-compatible callables) for the paper's annealing and learning rates."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def cosine_anneal(start: float, end: float, steps: int) -> optax.Schedule:
  """Half a cosine from `start` at step 0 to `end` at `steps`, then held (either direction).

  The dVAE uses it three times: beta 0 -> 6.6 over 5,000 updates, the Gumbel temperature
  1 -> 1/16 over 150,000 and the learning rate 1e-4 -> 1.25e-6 over 1,200,000.
  """
  if steps < 0:
    raise ValueError(f"steps must be >= 0, got {steps}")

  def schedule(step):
    if steps == 0:
      return jnp.asarray(end, jnp.float32)
    fraction = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * fraction))

  return schedule


def warmup_then(peak: float, warmup_steps: int, after: optax.Schedule | None = None
                ) -> optax.Schedule:
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then `after(step - warmup_steps)`."""
  after = after or optax.constant_schedule(peak)
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after],
                              [warmup_steps])
