"""Faults around a run directory: SIGTERM, a second writer, a changed config. Script runs use the
tiny dVAE; the library's parts are tested alone (a damaged checkpoint or a full disk:
test_checkpointing.py)."""

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
from dalle_jax.train import checkpointing, launch, preemption, run_config, workdir_lock
from experiments.configs import dvae_tiny, transformer_tiny

SCRIPT = os.path.join(REPO, "experiments", "train_dvae.py")
CONFIG = os.path.join(REPO, "experiments", "configs", "dvae_tiny.py")


def _command(workdir, *extra):
  return [sys.executable, SCRIPT, f"--config={CONFIG}", f"--workdir={workdir}",
          "--config.train.num_steps=8", "--config.checkpoint_every=100", *extra]


def _run(workdir, *extra, status=0):
  result = subprocess.run(_command(workdir, *extra), capture_output=True, text=True,
                          env={**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == status, result.stderr[-3000:]
  return result


def _tree(workdir):
  """Every file under `workdir` with its bytes."""
  return {os.path.relpath(os.path.join(d, f), workdir): open(os.path.join(d, f), "rb").read()
          for d, _, files in os.walk(workdir) for f in files}


def _state(workdir, step):
  config = dvae_tiny.get_config()
  from dalle_jax.dvae import model as dvae, training as dvae_training
  model = dvae.DVAEConfig(**config.model)
  train = dvae_training.DVAETrainConfig(**config.train)
  abstract = jax.eval_shape(lambda: dvae_training.init_state(model, train, jax.random.key(0)))
  return jax.device_get(checkpointing.restore_run(workdir, abstract, step))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """(an uninterrupted 8-step run, a run stopped by SIGTERM and resumed, the stop's output and
  step, the stopped workdir's files before the resume)."""
  straight = tmp_path_factory.mktemp("straight")
  _run(straight)
  workdir = tmp_path_factory.mktemp("stopped")
  process = subprocess.Popen(_command(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env={**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu"})
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if metrics.exists() and metrics.read_text().count("\n") >= 1:
      break
    time.sleep(0.02)
  assert process.poll() is None, "the run finished before it could be stopped"
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=120)[0]
  files = _tree(workdir)
  return straight, workdir, output, process.returncode, files


def test_sigterm_saves_at_the_step_reached_and_the_resumed_run_equals_an_uninterrupted_one(
    stopped):
  straight, workdir, output, status, _ = stopped
  assert status == preemption.PREEMPTED_EXIT_CODE, output[-3000:]
  steps = [int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
  assert len(steps) == 1 and 1 <= steps[0] < 8  # no periodic one was due: the stop saved it
  assert f"stopped by SIGTERM at step {steps[0]} of 8: checkpoint saved" in output
  assert "LOCK" not in os.listdir(workdir)
  result = _run(workdir)
  assert f"resumed from step {steps[0]}" in result.stdout
  jax.tree.map(np.testing.assert_array_equal, _state(workdir, 8), _state(straight, 8))


def test_a_second_run_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (tmp_path / "LOCK").write_text(json.dumps(
        {"host": os.uname().nodename, "pid": holder.pid, "since": "2026-01-01T00:00:00+00:00"}))
    result = _run(tmp_path, status=1)
  finally:
    holder.kill()
    holder.wait()
  assert (f"is in use by process {holder.pid} on {os.uname().nodename} since "
          "2026-01-01T00:00:00+00:00") in result.stderr
  assert "Traceback" not in result.stderr
  assert sorted(os.listdir(tmp_path)) == ["LOCK"]
  # The holder is gone now: its stale lock is taken over with a warning.
  lock = workdir_lock.WorkdirLock(tmp_path)
  lock.acquire()
  assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
  with pytest.raises(workdir_lock.WorkdirLocked, match=f"process {os.getpid()}"):
    workdir_lock.WorkdirLock(tmp_path).acquire()
  lock.release()
  assert not (tmp_path / "LOCK").exists()


def test_resuming_with_fields_that_shape_the_model_or_data_is_refused_and_nothing_changes(
    stopped):
  _, workdir, _, _, _ = stopped
  before = _tree(workdir)
  result = _run(workdir, "--config.model.vocab_size=16", "--config.train.batch_size=16",
                "--config.model.resolution=32", "--config.train.num_steps=9", status=1)
  assert "Traceback" not in result.stderr
  for line in ("model.vocab_size: saved 32, now 16", "train.batch_size: saved 8, now 16",
               "model.resolution: saved 16, now 32"):
    assert line in result.stderr
  assert "num_steps" not in result.stderr  # may change
  assert "--config.model.vocab_size=32" in result.stderr
  assert _tree(workdir) == before


@pytest.mark.parametrize("section", ["model", "data", "train", "sharding"])
def test_every_field_outside_may_change_is_refused(section):
  saved = json.loads(json.dumps(dvae_tiny.get_config().to_dict()))
  for name in saved[section]:
    new = json.loads(json.dumps(saved))
    new[section][name] = "changed"
    field = f"{section}.{name}"
    if run_config.may_change(field):
      assert run_config.check_resumable("w", saved, new) == {field: (saved[section][name],
                                                                     "changed")}
    else:
      with pytest.raises(run_config.ConfigMismatch, match=f"{field}: saved"):
        run_config.check_resumable("w", saved, new)


def test_the_transformers_sharding_rules_may_change_on_resume():
  saved = json.loads(json.dumps(transformer_tiny.get_config().to_dict()))
  new = json.loads(json.dumps(saved))
  new["sharding_rules"][1] = ["embed", None]
  assert run_config.check_resumable("w", saved, new) == {
      "sharding_rules": (saved["sharding_rules"], new["sharding_rules"])}


def test_allowed_changes_are_recorded_in_the_config_history(stopped):
  _, workdir, _, _, _ = stopped
  _run(workdir, "--config.log_every=2", "--config.train.learning_rate=5e-4")
  history = [json.loads(l) for l in (workdir / "config_history.jsonl").read_text().splitlines()]
  assert history[-1]["step"] == 8
  assert history[-1]["changes"] == {"log_every": [1, 2], "train.learning_rate": [1e-3, 5e-4]}
  assert json.loads((workdir / "config.json").read_text())["log_every"] == 2


def test_snapshots_are_pruned_like_checkpoints(tmp_path):
  from PIL import Image
  image = Image.new("RGB", (2, 2))
  for step in (2, 4, 6):
    launch.save_snapshot(image, tmp_path / "recon", step, keep=2)
  assert sorted(os.listdir(tmp_path / "recon")) == ["step_4.png", "step_6.png"]
  launch.save_snapshot(image, tmp_path / "recon", 8, keep=0)
  assert len(os.listdir(tmp_path / "recon")) == 3
  assert launch.snapshots_to_keep({"keep_checkpoints": 2}) == 2
  assert launch.snapshots_to_keep({"keep_checkpoints": 2, "keep_snapshots": 0}) == 0


def test_a_stage_run_by_the_demo_gets_the_signal_sent_to_the_demo(tmp_path):
  child = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *_: (print('child saved', flush=True), "
           f"sys.exit({preemption.PREEMPTED_EXIT_CODE})))\n"
           f"open({str(tmp_path / 'ready')!r}, 'w').close()\n"
           "time.sleep(60)\n")
  parent = subprocess.Popen(
      [sys.executable, "-c", "import sys; from dalle_jax.train import launch; "
       f"launch.run_stage([sys.executable, '-c', {child!r}])"],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  deadline = time.time() + 60
  while not (tmp_path / "ready").exists() and time.time() < deadline:
    time.sleep(0.05)
  parent.send_signal(signal.SIGTERM)
  output = parent.communicate(timeout=60)[0]
  assert output == "child saved\n"
  assert parent.returncode == preemption.PREEMPTED_EXIT_CODE
