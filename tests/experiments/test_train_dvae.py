"""experiments/train_dvae.py end to end: resume after SIGKILL and N + N == 2N, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import CACHE_ENV, REPO
from dalle_jax.dvae import model as dvae, training as dvae_training
from dalle_jax.train import checkpointing
from experiments.configs import dvae_tiny

SCRIPT = os.path.join(REPO, "experiments", "train_dvae.py")
CONFIG = os.path.join(REPO, "experiments", "configs", "dvae_tiny.py")


def _command(workdir, steps):
  return [sys.executable, SCRIPT, f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.train.num_steps={steps}"]


def _env():
  return {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu"}


def _train(workdir, steps):
  result = subprocess.run(_command(workdir, steps), env=_env(), capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _params(workdir, step):
  config = dvae_tiny.get_config()
  model = dvae.DVAEConfig(**config.model)
  train = dvae_training.DVAETrainConfig(**config.train)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(lambda: dvae_training.init_state(model, train, jax.random.key(0)))
  target = checkpointing.abstract_like(abstract, jax.tree.map(lambda _: device, abstract))
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  state, extras = checkpointer.restore(target, step)
  checkpointer.close()
  return jax.device_get(state), extras


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  _train(workdir, 8)
  return workdir


def test_a_straight_run_writes_metrics_reconstructions_and_checkpoints(uninterrupted):
  with open(uninterrupted / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  assert [l["step"] for l in lines if "loss" in l] == list(range(1, 9))
  assert [l["step"] for l in lines if "eval/psnr" in l] == [4, 8]
  assert (uninterrupted / "reconstructions" / "step_8.png").exists()
  assert sorted(os.listdir(uninterrupted / "checkpoints")) == ["6", "8"]  # keep 2
  state, extras = _params(uninterrupted, 8)
  assert int(state.step) == 8 and extras["loader"]["counts"]["usable"] == 64


def test_n_steps_then_resume_for_n_more_equals_2n_in_one_go(uninterrupted, tmp_path):
  _train(tmp_path, 4)
  result = _train(tmp_path, 8)
  assert "resumed from step 4" in result.stderr + result.stdout
  _assert_same(_params(tmp_path, 8)[0], _params(uninterrupted, 8)[0])


def test_sigkill_mid_run_resumes_from_the_last_complete_checkpoint(uninterrupted, tmp_path):
  process = subprocess.Popen(_command(tmp_path, 8), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  checkpoints = tmp_path / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if checkpoints.exists() and any(name.isdigit() for name in os.listdir(checkpoints)):
      break
    time.sleep(0.02)
  assert process.poll() is None, "the run finished before it could be killed"
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = max(int(n) for n in os.listdir(checkpoints) if n.isdigit())
  assert killed_at < 8
  _train(tmp_path, 8)
  _assert_same(_params(tmp_path, 8)[0], _params(uninterrupted, 8)[0])
  with open(tmp_path / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
  assert steps == list(range(1, 9))  # lines past the restored checkpoint were dropped
