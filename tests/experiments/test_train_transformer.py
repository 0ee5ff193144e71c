"""experiments/train_transformer.py end to end on simulated devices: resume after SIGKILL,
N + N == 2N bit for bit, and two processes of four devices == one process of eight."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import CACHE_ENV, REPO, make_stage2_data
from dalle_jax.train import checkpointing
from dalle_jax.transformer import training as transformer_training
from dalle_jax.transformer.model import TransformerConfig
from experiments.configs import transformer_tiny

SCRIPT = os.path.join(REPO, "experiments", "train_transformer.py")
CONFIG = os.path.join(REPO, "experiments", "configs", "transformer_tiny.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return make_stage2_data(str(tmp_path_factory.mktemp("stage2")))


def _command(data, workdir, steps, *extra):
  tokenizer_dir, codes_dir = data
  return [sys.executable, SCRIPT, f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.train.num_steps={steps}", f"--config.data.codes_dir={codes_dir}",
          f"--config.data.eval_codes_dir={codes_dir}",
          f"--config.data.tokenizer_dir={tokenizer_dir}", *extra]


def _env(devices=8):
  return {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


MESH = ("--config.mesh.fsdp=2", "--config.mesh.tensor=2")


def _train(data, workdir, steps, *extra):
  result = subprocess.run(_command(data, workdir, steps, *MESH, *extra), env=_env(),
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _state(workdir, step=None):
  config = transformer_tiny.get_config()
  model = TransformerConfig(**config.model)
  train = transformer_training.TransformerTrainConfig(**config.train)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(lambda: transformer_training.init_state(model, train,
                                                                     jax.random.key(0)))
  target = checkpointing.abstract_like(abstract, jax.tree.map(lambda _: device, abstract))
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  state, extras = checkpointer.restore(target, step)
  checkpointer.close()
  return jax.device_get(state), extras


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if '"loss"' in line]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  _train(data, workdir, 8)
  return workdir


def test_a_straight_run_writes_metrics_events_and_checkpoints(uninterrupted):
  lines = _losses(uninterrupted)
  assert [l["step"] for l in lines] == list(range(1, 9))
  assert all(np.isfinite(l["text_loss"]) and np.isfinite(l["image_loss"]) for l in lines)
  with open(uninterrupted / "metrics.jsonl") as f:
    evals = [json.loads(line) for line in f if "eval/image_loss" in line]
  assert [e["step"] for e in evals] == [4, 8] and "eval/text_loss" in evals[0]
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(uninterrupted /
                                                                     "tensorboard"))
  assert sorted(os.listdir(uninterrupted / "checkpoints")) == ["6", "8"]
  state, extras = _state(uninterrupted)
  assert int(state.step) == 8 and (extras["data"]["step"], extras["data"]["epoch"]) == (8, 0)


def test_n_steps_then_resume_for_n_more_equals_2n_in_one_go(data, uninterrupted, tmp_path):
  _train(data, tmp_path, 8, "--stop_at_step=4")
  result = _train(data, tmp_path, 8)
  assert "resumed from step 4" in result.stderr + result.stdout
  jax.tree.map(np.testing.assert_array_equal, _state(tmp_path, 8)[0], _state(uninterrupted, 8)[0])


def test_sigkill_mid_run_resumes_from_the_last_complete_checkpoint(data, uninterrupted, tmp_path):
  process = subprocess.Popen(_command(data, tmp_path, 8, *MESH), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = tmp_path / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if checkpoints.exists() and any(name.isdigit() for name in os.listdir(checkpoints)):
      break
    time.sleep(0.02)
  assert process.poll() is None, "the run finished before it could be killed"
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert max(int(n) for n in os.listdir(checkpoints) if n.isdigit()) < 8
  _train(data, tmp_path, 8)
  jax.tree.map(np.testing.assert_array_equal, _state(tmp_path, 8)[0], _state(uninterrupted, 8)[0])
  assert [l["step"] for l in _losses(tmp_path)] == list(range(1, 9))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_hosts_of_four_devices_equal_one_host_of_eight(data, uninterrupted, tmp_path):
  address = f"localhost:{_free_port()}"
  processes = [subprocess.Popen(
      _command(data, tmp_path, 8, *MESH, f"--coordinator_address={address}",
               "--num_processes=2", f"--process_id={i}"),
      env=_env(devices=4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  for process in processes:
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-3000:]
  two_hosts, one_host = _losses(tmp_path), _losses(uninterrupted)
  np.testing.assert_allclose([l["loss"] for l in two_hosts], [l["loss"] for l in one_host],
                             rtol=1e-5)
  # The state alone: each host's data position restores only on as many hosts as wrote it.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               transformer_training.load_trained(str(tmp_path), ema=False)[1],
               _state(uninterrupted)[0].params)


def test_a_mismatched_tokenizer_is_refused_before_compiling(data, tmp_path):
  result = subprocess.run(_command(data, tmp_path, 2, "--config.model.text_len=24"), env=_env(),
                          capture_output=True, text=True)
  assert result.returncode != 0
  assert "--config.model.text_len=16" in result.stderr
