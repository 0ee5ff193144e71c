"""experiments/encode_dataset.py: shards of (captions, argmax codes), resumable, from a dVAE run."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import CACHE_ENV, REPO
from dalle_jax.data import code_shards
from dalle_jax.data import make_source, pipeline
from dalle_jax.dvae import model as dvae, training as dvae_training
from dalle_jax.train import checkpointing
from experiments.configs import dvae_tiny

SCRIPT = os.path.join(REPO, "experiments", "encode_dataset.py")


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
  straight = code_shards.read_all(str(tmp_path / "straight"))
  # 4 shards of 32, 32, 32 and 4 examples, and the progress file
  assert straight["codes"].shape == (100, 1, 4, 4) and len(os.listdir(tmp_path / "straight")) == 5

  model, params = dvae_training.load_trained(str(dvae_workdir))
  loader = pipeline.Loader(make_source("shapes", resolution=16, num_examples=100),
                           pipeline.LoaderConfig(resolution=16, batch_size=100, shuffle=False,
                                                 num_epochs=1), process_index=0, process_count=1)
  batch = next(loader)
  expected = jax.jit(lambda p, x: dvae.encode(model, p, x))(params, batch["image"])
  np.testing.assert_array_equal(straight["codes"][:, 0], expected)
  assert list(straight["keys"]) == list(batch["key"])
  assert straight["captions"][0].split("\n")[0] in batch["captions"][0]

  chunked = tmp_path / "chunked"
  assert "stopped after 2 shards" in _encode(dvae_workdir, chunked, "--max_shards=2")
  assert "resuming after 2 shards" in _encode(dvae_workdir, chunked)
  assert "already encoded" in _encode(dvae_workdir, chunked)
  resumed = code_shards.read_all(str(chunked))
  for key in ("codes", "captions", "keys"):
    np.testing.assert_array_equal(resumed[key], straight[key])


def test_reading_an_empty_directory_says_what_to_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="encode_dataset.py"):
    code_shards.CodeShards(str(tmp_path))


def test_augmented_encodings_are_different_crops_of_each_image(dvae_workdir, tmp_path):
  """--augmentations=3 on 24x32 photos encoded at 16 px: encoding k is the dVAE's argmax of the
  k-th draw of the transformer crop (the loader with seed k), and the draws differ."""
  from conftest import encode_image, random_pixels, write_folder
  files = {f"photo{i}": (encode_image(random_pixels(i)), f"photo {i}".encode()) for i in range(8)}
  folder = write_folder(str(tmp_path / "photos"), files)
  result = subprocess.run(
      [sys.executable, SCRIPT, f"--dvae_workdir={dvae_workdir}", "--dataset=folder",
       f"--path={folder}", f"--out_dir={tmp_path / 'codes'}", "--batch_size=4",
       "--shard_size=4", "--augmentations=3"], env={**os.environ, **CACHE_ENV},
      capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  codes = code_shards.read_all(str(tmp_path / "codes"))["codes"]
  assert codes.shape == (8, 3, 4, 4)
  model, params = dvae_training.load_trained(str(dvae_workdir))
  for k in range(3):
    loader = pipeline.Loader(make_source("folder", resolution=16, path=folder),
                             pipeline.LoaderConfig(resolution=16, batch_size=8, shuffle=False,
                                                   crop="transformer", seed=k, num_epochs=1),
                             process_index=0, process_count=1)
    images = next(loader)["image"]
    expected = jax.jit(lambda p, x: dvae.encode(model, p, x))(params, images)
    np.testing.assert_array_equal(codes[:, k], expected)
  assert (codes[:, 0] != codes[:, 1]).any() and (codes[:, 1] != codes[:, 2]).any()


def test_old_npz_directories_convert_and_are_refused_with_the_command(dvae_workdir, tmp_path):
  old = tmp_path / "old"
  old.mkdir()
  codes = np.arange(6 * 16).reshape(6, 4, 4) % 32
  for index, part in enumerate((slice(0, 4), slice(4, 6))):
    np.savez(old / f"codes-000-{index:05d}.npz", codes=codes[part].astype(np.int16),
             captions=np.array(["a\nb", "c", "d", "e", "f", "g"][part]),
             keys=np.array([f"k{i}" for i in range(6)][part]))
  (old / "progress-000.json").write_text('{"done": true, "counts": {}}')
  with pytest.raises(FileNotFoundError, match=f"--convert_npz={old}"):
    code_shards.CodeShards(str(old))
  result = subprocess.run([sys.executable, SCRIPT, f"--convert_npz={old}",
                           f"--out_dir={tmp_path / 'new'}"], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "converted 6 examples" in result.stdout
  new = code_shards.read_all(str(tmp_path / "new"))
  np.testing.assert_array_equal(new["codes"][:, 0], codes)
  assert list(new["captions"]) == ["a\nb", "c", "d", "e", "f", "g"]
  assert list(new["keys"]) == [f"k{i}" for i in range(6)]
  assert (tmp_path / "new" / "progress-000.json").exists()


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
  ours = code_shards.read_all(str(tmp_path / "codes"))["codes"][:, 0]

  loader = pipeline.Loader(make_source("shapes", resolution=256, num_examples=4),
                           pipeline.LoaderConfig(resolution=256, batch_size=4, shuffle=False,
                                                 num_epochs=1), process_index=0, process_count=1)
  pixels = torch.from_numpy(next(loader)["image"]).permute(0, 3, 1, 2).float() / 255
  with torch.no_grad():
    theirs = encoder(dall_e.map_pixels(pixels)).argmax(1).numpy()
  assert ours.shape == (4, 32, 32)
  np.testing.assert_array_equal(ours, theirs)
