"""experiments/encode_dataset.py: shards of (captions, argmax codes), resumable, from a dVAE run."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import CACHE_ENV
from dalle_jax import checkpointing, dvae, dvae_training
from dalle_jax.data import codes as codes_lib
from dalle_jax.data import make_source, pipeline
from experiments.configs import dvae_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "encode_dataset.py")


@pytest.fixture(scope="module")
def dvae_workdir(tmp_path_factory):
  """A dVAE run directory as train_dvae.py leaves it: config.json and one checkpoint."""
  workdir = tmp_path_factory.mktemp("dvae")
  config = dvae_tiny.get_config()
  with open(workdir / "config.json", "w") as f:
    json.dump(config.to_dict(), f)
  model = dvae.DVAEConfig(**config.model)
  train = dvae_training.DVAETrainConfig(**config.train)
  checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"))
  checkpointer.save(3, dvae_training.init_state(model, train, jax.random.key(5)), {}, force=True)
  checkpointer.wait()
  checkpointer.close()
  return workdir


def _encode(dvae_workdir, out_dir, *extra):
  result = subprocess.run(
      [sys.executable, SCRIPT, f"--dvae_workdir={dvae_workdir}", "--dataset=shapes",
       "--num_examples=100", f"--out_dir={out_dir}", "--batch_size=16", "--shard_size=32",
       *extra], env={**os.environ, **CACHE_ENV}, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_codes_are_the_dvae_argmax_of_every_image_and_an_interrupted_run_continues(
    dvae_workdir, tmp_path):
  _encode(dvae_workdir, tmp_path / "straight")
  straight = codes_lib.read_shards(str(tmp_path / "straight"))
  assert straight["codes"].shape == (100, 4, 4) and len(os.listdir(tmp_path / "straight")) == 5

  model, params = dvae_training.load_trained(str(dvae_workdir))
  loader = pipeline.Loader(make_source("shapes", resolution=16, num_examples=100),
                           pipeline.LoaderConfig(resolution=16, batch_size=100, shuffle=False,
                                                 num_epochs=1), process_index=0, process_count=1)
  batch = next(loader)
  expected = jax.jit(lambda p, x: dvae.encode(model, p, x))(params, batch["image"])
  np.testing.assert_array_equal(straight["codes"], expected)
  assert list(straight["keys"]) == list(batch["key"])
  assert straight["captions"][0].split("\n")[0] in batch["captions"][0]

  chunked = tmp_path / "chunked"
  assert "stopped after 2 shards" in _encode(dvae_workdir, chunked, "--max_shards=2")
  assert "resuming after 2 shards" in _encode(dvae_workdir, chunked)
  assert "already encoded" in _encode(dvae_workdir, chunked)
  resumed = codes_lib.read_shards(str(chunked))
  for key in ("codes", "captions", "keys"):
    np.testing.assert_array_equal(resumed[key], straight[key])


def test_reading_an_empty_directory_says_what_to_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="encode_dataset.py"):
    codes_lib.read_shards(str(tmp_path))


def test_openai_pickles_encode_like_the_official_pytorch_encoder(tmp_path):
  import dall_e  # OpenAI's reference package; `make setup` installs it
  import torch

  torch.manual_seed(0)
  encoder = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512, requires_grad=False)
  decoder = dall_e.Decoder(n_hid=64, n_init=32, n_blk_per_group=1, vocab_size=512,
                           requires_grad=False)
  torch.save(encoder, tmp_path / "encoder.pkl")  # whole pickled modules, as OpenAI released them
  torch.save(decoder, tmp_path / "decoder.pkl")
  _encode_openai = subprocess.run(
      [sys.executable, SCRIPT, f"--openai_dvae={tmp_path}", "--dataset=shapes",
       "--num_examples=4", f"--out_dir={tmp_path / 'codes'}", "--batch_size=4",
       "--shard_size=4"], env={**os.environ, **CACHE_ENV}, capture_output=True, text=True)
  assert _encode_openai.returncode == 0, _encode_openai.stderr[-3000:]
  ours = codes_lib.read_shards(str(tmp_path / "codes"))["codes"]

  loader = pipeline.Loader(make_source("shapes", resolution=256, num_examples=4),
                           pipeline.LoaderConfig(resolution=256, batch_size=4, shuffle=False,
                                                 num_epochs=1), process_index=0, process_count=1)
  pixels = torch.from_numpy(next(loader)["image"]).permute(0, 3, 1, 2).float() / 255
  with torch.no_grad():
    theirs = encoder(dall_e.map_pixels(pixels)).argmax(1).numpy()
  assert ours.shape == (4, 32, 32)
  np.testing.assert_array_equal(ours, theirs)
