"""train_dvae.py on 2 processes x 4 simulated devices, fsdp spanning both: SIGTERM to one process
stops both at one step with a checkpoint; each host keeps its own loader position; SIGKILL and
resume; the result equals an uninterrupted run, and the sharded evaluation runs throughout."""

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

from conftest import REPO, encode_image, random_pixels, write_tar
from dalle_jax.dvae import model as dvae, training as dvae_training
from dalle_jax.train import checkpointing, preemption
from experiments.configs import dvae_tiny

SCRIPT = os.path.join(REPO, "experiments", "train_dvae.py")
CONFIG = os.path.join(REPO, "experiments", "configs", "dvae_tiny.py")
STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """4 shards of 8 samples; host 0 reads shards 0 and 2, host 1 shards 1 and 3. Shard 0 holds 3
  corrupt images, so host 0's skip counts differ from host 1's."""
  root = tmp_path_factory.mktemp("wds")
  paths = []
  for shard in range(4):
    members = {}
    for i in range(8):
      image = encode_image(random_pixels(shard * 8 + i))
      if shard == 0 and i < 3:
        image = b"not an image"
      members[f"s{shard}_{i}.png"] = image
      members[f"s{shard}_{i}.txt"] = f"sample {shard} {i}".encode()
    paths.append(write_tar(str(root / f"{shard:05d}.tar"), members))
  return ",".join(paths)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(shards, workdir):
  address = f"localhost:{_free_port()}"
  # No persistent compilation cache: with it, this run's first step fails on jax 0.10.2 CPU with
  # "Gloo context initialization failed" (both processes wait 30 s for each other; cause unknown).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_COMPILATION_CACHE": "false",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  logs = [open(f"{workdir}.{i}.log", "a") for i in range(2)]  # not pipes: unread, they block
  return [subprocess.Popen(
      [sys.executable, SCRIPT, f"--config={CONFIG}", f"--workdir={workdir}",
       f"--config.train.num_steps={STEPS}", "--config.data.dataset=webdataset",
       f"--config.data.path={shards}", "--config.data.eval_split=train",
       "--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.checkpoint_every=6",
       "--config.eval_every=4", "--config.image_every=0",
       f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
      env=env, stdout=logs[i], stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish(processes, workdir, status=0):
  for process in processes:
    process.wait(timeout=300)
  outputs = [open(f"{workdir}.{i}.log").read() for i in range(2)]
  for process, output in zip(processes, outputs):
    assert process.returncode == status, output[-3000:]
  return outputs


def _wait_for(predicate, processes, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline and not predicate():
    assert all(p.poll() is None for p in processes), "a process ended early"
    time.sleep(0.05)
  assert predicate(), "timed out"


def _logged_steps(workdir):
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(l)["step"] for l in path.read_text().splitlines() if '"loss"' in l]


def _checkpoint(workdir, step):
  config = dvae_tiny.get_config()
  model = dvae.DVAEConfig(**config.model)
  train = dvae_training.DVAETrainConfig(**config.train)
  abstract = jax.eval_shape(lambda: dvae_training.init_state(model, train, jax.random.key(0)))
  state = checkpointing.restore_run(workdir, abstract, step)
  extras = workdir / "checkpoints" / str(step) / "extras"
  hosts = [json.loads((extras / f"process_{i}-of-2.json").read_text()) for i in range(2)]
  return jax.device_get(state), hosts


def test_two_hosts_sigterm_then_sigkill_resume_equal_an_uninterrupted_run(shards, tmp_path):
  straight = tmp_path / "straight"
  straight_out = _finish(_launch(shards, straight), straight)
  assert f"done at step {STEPS}" in straight_out[0]
  with open(straight / "metrics.jsonl") as f:
    assert [json.loads(l)["step"] for l in f if "eval/psnr" in l] == [4, 8]

  workdir = tmp_path / "stopped"
  processes = _launch(shards, workdir)
  _wait_for(lambda: _logged_steps(workdir), processes)
  processes[1].send_signal(signal.SIGTERM)  # one host told: both stop at one step
  outputs = _finish(processes, workdir, preemption.PREEMPTED_EXIT_CODE)
  stopped = max(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
  assert stopped < 6, outputs[0][-2000:]
  assert f"at step {stopped} of {STEPS}: checkpoint saved" in outputs[0]
  _, hosts = _checkpoint(workdir, stopped)  # each host wrote its own position
  assert hosts[0]["loader"]["iterator"] != hosts[1]["loader"]["iterator"]

  processes = _launch(shards, workdir)  # resume; killed once step 6's checkpoint is complete
  _wait_for(lambda: (workdir / "checkpoints" / "6").exists(), processes)
  for process in processes:
    process.send_signal(signal.SIGKILL)
    process.wait()
  _finish(_launch(shards, workdir), workdir)
  state, hosts = _checkpoint(workdir, STEPS)
  straight_state, straight_hosts = _checkpoint(straight, STEPS)
  jax.tree.map(np.testing.assert_array_equal, state, straight_state)
  assert hosts == straight_hosts  # both hosts' positions and skip counts
  assert hosts[0]["loader"]["counts"] != hosts[1]["loader"]["counts"]
  assert _logged_steps(workdir) == list(range(1, STEPS + 1))
