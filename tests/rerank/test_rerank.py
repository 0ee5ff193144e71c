"""dalle_jax/rerank/model.py and experiments/train_reranker.py: refusals, a falling loss, a short
training that ranks true (image, caption) pairs of held-out shapes above shuffled ones, and the
script end to end with resume and `load_trained`."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CACHE_ENV, REPO
from dalle_jax import tokenizer as tokenizer_lib
from dalle_jax.data import make_source, pipeline, shapes
from dalle_jax.rerank import model as rerank, training as rerank_training
from experiments.configs import reranker_tiny

SCRIPT = os.path.join(REPO, "experiments", "train_reranker.py")
CONFIG = os.path.join(REPO, "experiments", "configs", "reranker_tiny.py")
MODEL = rerank.RerankerConfig(**reranker_tiny.get_config().model)
TRAIN = rerank_training.RerankerTrainConfig(batch_size=32, num_steps=400, learning_rate=2e-3,
                                   warmup_steps=20, ema_decay=0.0)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  # Every 5th scene still holds every word of the grammar; 400 pieces make each word one piece,
  # so the longest caption (15 words) fits in text_len 16.
  captions = [c for s in shapes.all_scenes("train")[::5] for c in shapes.all_captions(s)]
  directory = str(tmp_path_factory.mktemp("tokenizer"))
  tokenizer_lib.train_tokenizer(captions, MODEL.text_vocab_size, MODEL.text_len, directory)
  return directory


def _batches(tokenizer_dir, split, examples, seed):
  """`examples` shapes of `split` as (uint8[32, 16, 16, 3], int32[32, 16]) batches, no dropout."""
  loader = pipeline.Loader(
      make_source("shapes", resolution=MODEL.resolution, num_examples=examples, split=split,
                  seed=seed),
      pipeline.LoaderConfig(resolution=MODEL.resolution, batch_size=TRAIN.batch_size, seed=seed,
                            num_epochs=1, bpe_dropout=False),
      tokenizer=tokenizer_lib.Tokenizer.load(tokenizer_dir), process_index=0, process_count=1)
  return [(jnp.asarray(b["image"]), jnp.asarray(b["text"])) for b in loader]


@pytest.fixture(scope="module")
def step():
  return jax.jit(functools.partial(rerank_training.train_step, MODEL, TRAIN), donate_argnums=0)


def test_bad_configs_and_inputs_are_refused():
  with pytest.raises(ValueError, match="patch_size 5 does not divide resolution 16"):
    rerank.RerankerConfig(resolution=16, patch_size=5)
  with pytest.raises(ValueError, match="text_heads 3 does not divide text_width 32"):
    rerank.RerankerConfig(text_width=32, text_heads=3)
  with pytest.raises(ValueError, match="image_depth must be >= 1"):
    rerank.RerankerConfig(image_depth=0)
  with pytest.raises(ValueError, match="batch_size must be >= 2"):
    rerank_training.RerankerTrainConfig(batch_size=1)
  tokenizer = type("Tok", (), {"vocab_size": 320, "text_len": 16})()
  with pytest.raises(ValueError, match="text_vocab_size=320"):
    rerank.check_tokenizer(MODEL, tokenizer)
  params = rerank.init(MODEL, jax.random.key(0))
  images = np.zeros((2, 16, 16, 3), np.uint8)
  text = np.full((2, 16), MODEL.text_vocab_size, np.int32)
  with pytest.raises(ValueError, match="uint8"):
    rerank.score(params, MODEL, images.astype(np.float32), text)
  with pytest.raises(ValueError, match="one caption per image"):
    rerank.score(params, MODEL, images, text[:1])
  with pytest.raises(ValueError, match="another tokenizer"):
    rerank.score(params, MODEL, images, text + MODEL.text_len)
  with pytest.raises(ValueError, match="keep must be in"):
    rerank.rerank(jnp.zeros(4), 5)


def test_rerank_keeps_the_best_first():
  np.testing.assert_array_equal(rerank.rerank(jnp.array([0.1, 0.9, -0.3, 0.5]), 2), [1, 3])
  np.testing.assert_array_equal(rerank.rerank(jnp.array([[1.0, 2.0], [2.0, 1.0]]), 1),
                                [[1], [0]])


def test_loss_falls_on_a_real_batch(tokenizer_dir, step):
  images, text = _batches(tokenizer_dir, "train", TRAIN.batch_size, seed=3)[0]
  state = rerank_training.init_state(MODEL, TRAIN, jax.random.key(1))
  losses = []
  for _ in range(30):
    state, metrics = step(state, images, text)
    losses.append(float(metrics["loss"]))
  print("losses", " ".join(f"{l:.2f}" for l in losses[::5]), f"{losses[-1]:.2f}")
  assert losses[-1] < 0.5 * min(losses[0], np.log(TRAIN.batch_size)), losses


def test_short_training_ranks_true_pairs_of_heldout_shapes_above_shuffled(tokenizer_dir, step):
  train_batches = _batches(tokenizer_dir, "train", 2048, seed=0)
  state = rerank_training.init_state(MODEL, TRAIN, jax.random.key(0))
  for i in range(TRAIN.num_steps):
    state, _ = step(state, *train_batches[i % len(train_batches)])

  # Held-out colour-shape pairs: the model must compose attributes it saw apart.
  true, shuffled, hits, trials = [], [], 0, 0
  for images, text in _batches(tokenizer_dir, "heldout", 4 * TRAIN.batch_size, seed=1):
    true.append(rerank.score(state.params, MODEL, images, text))
    shuffled.append(rerank.score(state.params, MODEL, images, jnp.roll(text, 1, axis=0)))
    for i in range(len(text)):  # rerank the batch's images for caption i: is image i best?
      scores = rerank.score(state.params, MODEL, images, jnp.tile(text[i], (len(text), 1)))
      hits += int(rerank.rerank(scores, 1)[0] == i)
      trials += 1
  true, shuffled = np.concatenate(true), np.concatenate(shuffled)
  top1 = hits / trials
  print(f"held-out: true {true.mean():.3f}, shuffled {shuffled.mean():.3f}, top-1 of "
        f"{TRAIN.batch_size}: {top1:.3f} (chance {1 / TRAIN.batch_size:.3f})")
  assert true.mean() > shuffled.mean() + 0.3
  assert np.mean(true > shuffled) > 0.9
  assert top1 > 8 / TRAIN.batch_size


def _env():
  return {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu"}


def _train(tokenizer_dir, workdir, steps):
  command = [sys.executable, SCRIPT, f"--config={CONFIG}", f"--workdir={workdir}",
             f"--config.train.num_steps={steps}", f"--config.data.tokenizer_dir={tokenizer_dir}"]
  result = subprocess.run(command, env=_env(), capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout + result.stderr


def test_the_script_trains_resumes_and_load_trained_returns_the_params(tokenizer_dir, tmp_path):
  _train(tokenizer_dir, tmp_path, 4)
  assert "resumed from step 4" in _train(tokenizer_dir, tmp_path, 6)
  with open(tmp_path / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  assert [l["step"] for l in lines if "loss" in l] == list(range(1, 7))
  assert [l["step"] for l in lines if "eval/top1" in l] == [4, 6]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]

  config, params, tokenizer_path = rerank_training.load_trained(str(tmp_path))
  assert config == MODEL
  assert jax.tree.structure(params) == jax.tree.structure(rerank.init(MODEL, jax.random.key(0)))
  _, raw_params, _ = rerank_training.load_trained(str(tmp_path), ema=False)
  differs = jax.tree.map(lambda a, b: not np.array_equal(a, b), params, raw_params)
  assert any(jax.tree.leaves(differs))  # the EMA (the default) lags the raw parameters
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path)
  text = np.stack([tokenizer.encode("a small red circle in the center")[0]] * 2)
  images = np.stack([shapes.render_caption("a small red circle in the center", 16),
                     shapes.render_caption("a large blue square at the top", 16)])
  scores = rerank.score(params, config, jnp.asarray(images), jnp.asarray(text))
  assert scores.shape == (2,) and np.all(np.abs(np.asarray(scores)) <= 1 + 1e-5)
  with pytest.raises(FileNotFoundError, match="train_reranker.py workdir"):
    rerank_training.load_trained(str(tmp_path / "missing"))
