"""dalle_jax/train/checkpointing.py: a round trip across placements, when saves are due and how
many are kept, and the faults: a damaged newest checkpoint, a killed save's leftovers, a full disk."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dalle_jax.train import checkpointing


def test_a_state_and_its_extras_restore_as_saved_onto_another_mesh(tmp_path):
  eight = jax.make_mesh((8,), ("x",))
  state = {"w": jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(eight, P("x"))),
           "step": jnp.int32(3)}
  extras = {"data": {"epoch": 1, "position": [4, 5]}}
  checkpointer = checkpointing.Checkpointer(tmp_path / "ck", asynchronous=False)
  assert checkpointer.save(3, state, extras, force=True)
  # Onto a 2 x 4 mesh, split along the other axis: what a run resumed on another slice does.
  other = jax.make_mesh((2, 4), ("a", "b"))
  target = {"w": NamedSharding(other, P(None, "b")), "step": NamedSharding(other, P())}
  restored, restored_extras = checkpointer.restore(checkpointing.abstract_like(state, target))
  checkpointer.close()
  assert restored_extras == extras
  assert restored["w"].sharding == target["w"] and int(restored["step"]) == 3
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
  assert checkpointing.Checkpointer(tmp_path / "empty").restore(state) is None


def test_saves_when_due_or_forced_and_keeps_the_newest(tmp_path):
  checkpointer = checkpointing.Checkpointer(tmp_path / "ck", keep=2, every=2, asynchronous=False)
  state = lambda step: {"w": jnp.full((4,), step, jnp.float32)}
  due = [checkpointer.save(step, state(step), {}) for step in range(1, 8)]
  assert due == [False, True, False, True, False, True, False]
  assert checkpointer.save(7, state(7), {}, force=True)  # the last step, or a preemption
  checkpointer.wait()
  assert checkpointer.all_steps() == [6, 7] and checkpointer.latest_step() == 7
  checkpointer.close()
  assert sorted(os.listdir(tmp_path / "ck")) == ["6", "7"]


def _tiny_checkpoints(directory, steps):
  """A checkpointer that has saved {"w": float32[64] of the step} at `steps`, and its placement."""
  mesh = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])
  replicated = NamedSharding(mesh, P())
  checkpointer = checkpointing.Checkpointer(directory, keep=5, every=1)
  for step in steps:
    checkpointer.save(step, {"w": jnp.full((64,), step, jnp.float32)}, {"step": step})
  checkpointer.wait()
  return checkpointer, {"w": replicated}


def _truncate_arrays(step_dir):
  """Cuts every array data file of a checkpoint step (ocdbt's `d/` folders) to 3 bytes."""
  for directory, _, files in os.walk(step_dir / "state"):
    for name in files if os.path.basename(directory) == "d" else []:
      with open(os.path.join(directory, name), "r+b") as f:
        f.truncate(3)


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
  checkpointer, shardings = _tiny_checkpoints(tmp_path / "ck", [1, 2])
  checkpointer.close()
  _truncate_arrays(tmp_path / "ck" / "2")
  checkpointer = checkpointing.Checkpointer(tmp_path / "ck", keep=5)
  reports = []
  init = lambda rng: {"w": jnp.zeros((64,), jnp.float32)}
  state, extras = checkpointing.restore_or_create(checkpointer, init, None, shardings,
                                                  report=reports.append)
  assert extras == {"step": 1} and float(state["w"][0]) == 1.0
  assert len(reports) == 1 and reports[0].startswith("checkpoint 2 in ")
  assert "trying the one before" in reports[0] and "\n" not in reports[0]
  _truncate_arrays(tmp_path / "ck" / "1")
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoint in .* can be restored"):
    checkpointing.restore_or_create(checkpointer, init, None, shardings, report=reports.append)


def test_orphaned_temporary_checkpoints_are_removed_at_start(tmp_path):
  checkpointer, _ = _tiny_checkpoints(tmp_path / "ck", [1])
  checkpointer.close()
  orphan = tmp_path / "ck" / "2.orbax-checkpoint-tmp-1234"
  orphan.mkdir()
  checkpointing.Checkpointer(tmp_path / "ck").close()
  assert sorted(os.listdir(tmp_path / "ck")) == ["1"]


def test_a_full_disk_is_reported_at_the_failing_save_and_the_previous_checkpoint_stays(
    tmp_path, monkeypatch):
  checkpointer, shardings = _tiny_checkpoints(tmp_path / "ck", [1])
  free = lambda path: type("Usage", (), {"free": 100})()
  monkeypatch.setattr(checkpointing.shutil, "disk_usage", free)
  with pytest.raises(checkpointing.CheckpointError) as error:
    checkpointer.save(2, {"w": jnp.zeros((64,), jnp.float32)}, {"step": 2}, force=True)
  message = str(error.value)
  assert message.startswith(f"the checkpoint at step 2 cannot be written: {tmp_path / 'ck'} is "
                            "out of space (0.0 MiB free); one checkpoint needs about 0.0 MiB")
  assert "The previous checkpoint (step 1) is intact" in message
  # A write that fails for want of space inside orbax is reported the same way, at that save.
  monkeypatch.undo()
  real_save = checkpointer._manager.save

  def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")

  checkpointer._manager.save = no_space
  with pytest.raises(checkpointing.CheckpointError, match="at step 3 cannot be written.*No space"):
    checkpointer.save(3, {"w": jnp.zeros((64,), jnp.float32)}, {"step": 3}, force=True)
  checkpointer._manager.save = real_save
  checkpointer.close()
  restored = checkpointing.Checkpointer(tmp_path / "ck").restore(
      checkpointing.abstract_like({"w": jnp.zeros((64,))}, shardings), 1)
  assert restored[1] == {"step": 1} and float(restored[0]["w"][0]) == 1.0
  assert sorted(os.listdir(tmp_path / "ck")) == ["1"]
