"""Test set-up: 8 simulated CPU devices, a shared compilation cache, and small real datasets."""

import io
import os
import tarfile
import tempfile

import jax

from dalle_jax.train import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

# Before any JAX computation: sharded tests need several devices; single-device tests use the first.
jax.config.update("jax_num_cpu_devices", 8)
# Subprocess tests (kill and resume) compile the same programs again: share the work through a cache.
COMPILATION_CACHE = os.path.join(tempfile.gettempdir(), "dalle_jax_test_xla_cache")
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": COMPILATION_CACHE,
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
# Scripts the tests start inherit the huge-page malloc, so `launch.run` need not restart them.
os.environ.update(launch.hugepages_env(os.environ))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def encode_image(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
  """uint8[H, W, 3] -> file bytes in `fmt`, optionally converted to a Pillow `mode` first."""
  image = Image.fromarray(array)
  if mode is not None:
    image = image.convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


def random_pixels(seed: int, height: int = 24, width: int = 32) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_tar(path: str, members: dict[str, bytes]) -> str:
  """A tar shard with the given member names and contents, in order."""
  with tarfile.open(path, "w") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


@pytest.fixture
def bad_and_good_files():
  """Caption/image file contents: 4 good pairs and one of each kind of bad input.

  Returns a dict stem -> (image bytes or None, caption bytes or None) and the expected counts.
  """
  good = encode_image(random_pixels(0), "PNG")
  files = {
      "good_png": (good, b"a red square\n"),
      "good_jpeg_rgba": (encode_image(random_pixels(1), "PNG", "RGBA"), b"first caption\nsecond"),
      "good_grey_jpeg": (encode_image(random_pixels(2), "JPEG", "L"), b"a grey photo"),
      "good_palette_gif": (encode_image(random_pixels(3), "GIF", "P"), "un caf\u00e9".encode()),
      "truncated": (good[: len(good) // 2], b"cut in half"),
      "not_an_image": (b"this is text, not a png", b"garbage"),
      "empty_caption": (good, b"  \n\n"),
      "latin1_caption": (good, "caf\xe9".encode("latin-1")),
      "no_caption": (good, None),
      "no_image": (None, b"an orphan caption"),
  }
  expected = {"usable": 4, "corrupt_image": 2, "empty_caption": 1, "caption_not_utf8": 1,
              "missing_caption": 1, "missing_image": 1}
  return files, expected


def write_folder(root: str, files: dict) -> str:
  """Writes `files` (stem -> (image, caption)) as a nested folder dataset under `root`."""
  for i, (stem, (image, caption)) in enumerate(sorted(files.items())):
    directory = os.path.join(root, f"part{i % 2}")
    os.makedirs(directory, exist_ok=True)
    if image is not None:
      with open(os.path.join(directory, stem + ".png"), "wb") as f:
        f.write(image)
    if caption is not None:
      with open(os.path.join(directory, stem + ".txt"), "wb") as f:
        f.write(caption)
  return root


def make_stage2_data(root: str, *, vocab_size: int = 320, text_len: int = 16, grid: int = 4,
                     image_vocab: int = 32, examples: int = 64) -> tuple[str, str]:
  """A tokenizer and code shards for stage-2 tests: shapes captions, each with a fixed random
  code grid drawn from its caption (so a model can learn them). Returns (tokenizer_dir,
  codes_dir)."""
  from dalle_jax import tokenizer as tokenizer_lib
  from dalle_jax.data import code_shards
  from dalle_jax.data import shapes

  scenes = shapes.all_scenes("train")[:examples]
  captions = ["\n".join(shapes.all_captions(s)[:2]) for s in scenes]
  tokenizer_dir, codes_dir = os.path.join(root, "tokenizer"), os.path.join(root, "codes")
  tokenizer_lib.train_tokenizer([c for cs in captions for c in cs.split("\n")], vocab_size,
                                text_len, tokenizer_dir)
  codes = np.stack([np.random.default_rng(i).integers(0, image_vocab, (grid, grid))
                    for i in range(examples)])
  os.makedirs(codes_dir, exist_ok=True)
  half = examples // 2
  for index, part in enumerate((slice(0, half), slice(half, examples))):
    code_shards.write_shard(code_shards.shard_path(codes_dir, 0, index), codes[part],
                            captions[part], [f"k{i}" for i in range(examples)][part])
  return tokenizer_dir, codes_dir


def train_tiny_stages(root: str, *, dvae16: bool = False) -> dict[str, str]:
  """2-step tiny runs trained side by side on `make_stage2_data`: `transformer` (its config naming
  `dvae`, 16 px and 4x4 codes), `dvae`, `reranker`, and with `dvae16` a dVAE of 16 codes.
  Returns their workdirs."""
  import json
  import subprocess
  import sys

  experiments = os.path.join(REPO, "experiments")
  configs = os.path.join(experiments, "configs")
  env = {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu"}
  tokenizer_dir, codes_dir = make_stage2_data(root)
  names = ("transformer", "dvae", "reranker") + (("dvae16",) if dvae16 else ())
  paths = {name: os.path.join(root, name) for name in names}
  dvae_flags = (f"--config={configs}/dvae_tiny.py", "--config.train.num_steps=2",
                "--config.data.eval_split=")
  commands = [
      ("train_transformer.py", f"--config={configs}/transformer_tiny.py",
       f"--workdir={paths['transformer']}", "--config.train.num_steps=2",
       f"--config.data.codes_dir={codes_dir}", f"--config.data.tokenizer_dir={tokenizer_dir}"),
      ("train_dvae.py", *dvae_flags, f"--workdir={paths['dvae']}"),
      ("train_reranker.py", f"--config={configs}/reranker_tiny.py",
       f"--workdir={paths['reranker']}", "--config.train.num_steps=2",
       f"--config.data.tokenizer_dir={tokenizer_dir}", "--config.model.text_vocab_size=320",
       "--config.data.num_examples=64"),
  ]
  if dvae16:
    commands.append(("train_dvae.py", *dvae_flags, f"--workdir={paths['dvae16']}",
                     "--config.model.vocab_size=16"))
  processes = [subprocess.Popen([sys.executable, os.path.join(experiments, script), *flags],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for script, *flags in commands]
  for process in processes:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
  # Named only now: training would load the dVAE to draw sample grids.
  config_path = os.path.join(paths["transformer"], "config.json")
  with open(config_path) as f:
    config = json.load(f)
  config["data"]["dvae_workdir"] = paths["dvae"]
  with open(config_path, "w") as f:
    json.dump(config, f)
  return paths


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, str]:
  """`train_tiny_stages`'s runs, trained once for every test module that reads them."""
  return train_tiny_stages(str(tmp_path_factory.mktemp("tiny_runs")))
