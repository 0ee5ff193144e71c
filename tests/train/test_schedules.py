"""dalle_jax/train/schedules.py: the paper's cosine annealing and a linear warm-up."""

import numpy as np
import pytest

from dalle_jax.train import schedules


def test_cosine_anneal_hits_its_ends_and_midpoint_and_then_holds():
  beta = schedules.cosine_anneal(0.0, 6.6, 5000)  # the paper's KL weight warm-up
  values = [float(beta(s)) for s in (0, 2500, 5000, 10_000)]
  np.testing.assert_allclose(values, [0.0, 3.3, 6.6, 6.6], atol=1e-5)
  tau = schedules.cosine_anneal(1.0, 1 / 16, 150_000)  # the Gumbel temperature
  np.testing.assert_allclose([float(tau(0)), float(tau(37_500)), float(tau(150_000))],
                             [1.0, 1 / 16 + (1 - 1 / 16) * (1 + np.cos(np.pi / 4)) / 2, 1 / 16],
                             rtol=1e-5)
  assert float(tau(1000)) > float(tau(2000))  # monotone on the way


def test_zero_length_schedule_is_its_end_value_and_negative_is_refused():
  assert float(schedules.cosine_anneal(1.0, 0.5, 0)(0)) == 0.5
  with pytest.raises(ValueError):
    schedules.cosine_anneal(1.0, 0.5, -1)


def test_warmup_rises_linearly_then_follows_the_next_schedule():
  lr = schedules.warmup_then(4.5e-4, 100, schedules.cosine_anneal(4.5e-4, 0.0, 100))
  np.testing.assert_allclose([float(lr(s)) for s in (0, 50, 100, 150, 200)],
                             [0.0, 2.25e-4, 4.5e-4, 2.25e-4, 0.0], atol=1e-9)
