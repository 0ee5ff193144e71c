"""dalle_jax/train/tensorboard_writer.py and the trainers' events, read back with TensorBoard's own reader."""

import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator

from conftest import CACHE_ENV, REPO, make_stage2_data
from dalle_jax.train import tensorboard_writer

EXPERIMENTS = os.path.join(REPO,
                           "experiments")


def read(logdir: str) -> event_accumulator.EventAccumulator:
  accumulator = event_accumulator.EventAccumulator(logdir, size_guidance={"images": 0})
  accumulator.Reload()
  return accumulator


def scalars(events, tag: str) -> list[tuple[int, float]]:
  return [(e.step, e.value) for e in events.Scalars(tag)]


def decoded(image_event) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)).convert("RGB"))


def test_scalars_and_images_round_trip_and_a_resume_hides_what_the_killed_run_logged(tmp_path):
  logdir = str(tmp_path)
  picture = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
  events = tensorboard_writer.EventLog(logdir)
  for step in range(1, 5):
    events.scalars(step, {"loss": 1.0 / step, "lr": np.float32(step * 1e-4),
                          "per_device": np.ones(8)})  # not a scalar: left out
  events.image(2, "samples", Image.fromarray(picture))
  events.image(4, "samples", picture[::-1])
  events.close()
  # Killed after step 4, resumed from the checkpoint of step 2: steps 3 and 4 are redone.
  resumed = tensorboard_writer.EventLog(logdir, resume_step=2)
  resumed.scalars(3, {"loss": -3.0})
  resumed.close()

  got = read(logdir)
  assert sorted(got.Tags()["scalars"]) == ["loss", "lr"]
  assert scalars(got, "loss") == [(1, 1.0), (2, 0.5), (3, -3.0)]
  assert [step for step, _ in scalars(got, "lr")] == [1, 2]
  assert [value for _, value in scalars(got, "lr")] == pytest.approx([1e-4, 2e-4])
  (image,) = got.Images("samples")  # step 4's was purged with the rest of the killed run
  assert (image.step, image.width, image.height) == (2, 10, 6)
  np.testing.assert_array_equal(decoded(image), picture)


def test_bad_images_and_other_hosts(tmp_path):
  events = tensorboard_writer.EventLog(str(tmp_path / "run"))
  with pytest.raises(ValueError, match=r"samples: expected uint8\[H, W, 3\], got float32"):
    events.image(1, "samples", np.zeros((4, 4, 3), np.float32))
  events.close()
  quiet = tensorboard_writer.EventLog(str(tmp_path / "other_host"), enabled=False)
  quiet.scalars(1, {"loss": 1.0})
  quiet.image(1, "samples", np.zeros((4, 4, 3), np.uint8))
  quiet.close()
  assert not os.path.exists(tmp_path / "other_host")


def run_all(commands: list[list[str]]) -> None:
  env = {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu"}
  processes = [subprocess.Popen([sys.executable, *command], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for command in commands]
  for process in processes:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]


def test_the_three_trainers_log_scalars_and_images(tiny_runs, tmp_path):
  configs = os.path.join(EXPERIMENTS, "configs")
  tokenizer_dir, codes_dir = make_stage2_data(str(tmp_path / "data"))
  workdirs = {name: str(tmp_path / name) for name in ("dvae", "reranker", "transformer")}
  run_all([
      [os.path.join(EXPERIMENTS, "train_dvae.py"), f"--config={configs}/dvae_tiny.py",
       f"--workdir={workdirs['dvae']}", "--config.train.num_steps=2",
       "--config.image_every=2", "--config.eval_every=2"],
      [os.path.join(EXPERIMENTS, "train_reranker.py"), f"--config={configs}/reranker_tiny.py",
       f"--workdir={workdirs['reranker']}", "--config.train.num_steps=2",
       "--config.eval_every=2", f"--config.data.tokenizer_dir={tokenizer_dir}",
       "--config.model.text_vocab_size=320", "--config.data.num_examples=64"],
      [os.path.join(EXPERIMENTS, "train_transformer.py"),
       f"--config={configs}/transformer_tiny.py", f"--workdir={workdirs['transformer']}",
       "--config.train.num_steps=2", "--config.sample_every=2", "--config.log_every=1",
       f"--config.data.codes_dir={codes_dir}", f"--config.data.tokenizer_dir={tokenizer_dir}",
       f"--config.data.dvae_workdir={tiny_runs['dvae']}"],
  ])
  figures = {"dvae": ("reconstructions", 192), "reranker": ("retrieval", 96),
             "transformer": ("samples", 96)}
  for name, workdir in workdirs.items():
    events = read(os.path.join(workdir, "tensorboard"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      logged = [line for line in map(json.loads, f) if "loss" in line]
    # The same losses as metrics.jsonl (float32 in the event file).
    steps, values = zip(*scalars(events, "loss"))
    assert list(steps) == [line["step"] for line in logged] == [1, 2], name
    assert values == pytest.approx([line["loss"] for line in logged], rel=1e-6), name
    tag, tile = figures[name]
    (image,) = events.Images(tag)
    picture = decoded(image)
    assert image.step == 2 and picture.shape[1] % (tile + 8) == 0, name
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 10, name  # drawn, not blank
  assert any(tag.startswith("eval/") for tag in read(
      os.path.join(workdirs["reranker"], "tensorboard")).Tags()["scalars"])
