"""dalle_jax/generate.py: the same codes as the sampler used directly (any batch size, one
compilation per batch shape), OpenAI's released dVAE decoding samples, priming and variations,
reranking, and a one-line error for each bad input."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dalle_jax import generate, sharding
from dalle_jax.data import preprocess
from dalle_jax.dvae import model as dvae
from dalle_jax.transformer import model as transformer, sampling, training as transformer_training

CAPTIONS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def runs(tiny_runs):
  """A 2-step tiny transformer (16 px, 4x4 codes over 32) naming its 2-step dVAE, a reranker."""
  return tiny_runs


@pytest.fixture(scope="module")
def gen(runs):
  return generate.Generator.load(runs["transformer"])


def _direct(gen, captions, per_caption, seed, settings, prime=None):
  """What `sampling.make_sampler` draws for sample g = caption * per_caption + j with the key
  fold_in(key(seed), g), all in one batch."""
  total = len(captions) * per_caption
  text = np.stack([gen.tokenizer.encode(c)[0] for c in captions])[np.arange(total) // per_caption]
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(total))
  grid = gen.config.image_size
  prime = np.zeros((grid, grid), np.int32) if prime is None else prime
  sample = sampling.make_sampler(gen.config, gen.dvae_config,
                                 guided=float(settings.guidance) != 1.0)
  images, codes = sample(gen.params, gen.dvae_params, jnp.asarray(text), keys, settings,
                         jnp.asarray(np.broadcast_to(prime, (total, grid, grid))))
  shape = (len(captions), per_caption)
  return np.asarray(images).reshape(*shape, *images.shape[1:]), \
      np.asarray(codes).reshape(*shape, grid, grid)


def test_draws_the_sampler_s_codes_at_any_batch_size_compiling_once_per_shape(gen):
  settings = sampling.SampleSettings(temperature=0.9, top_k=8, guidance=2.0)
  images, codes = _direct(gen, CAPTIONS, 3, 5, settings)
  assert len({c.tobytes() for c in codes.reshape(6, -1)}) > 1  # different keys, different draws
  for batch_size in (4, 5, 4):
    result = gen.generate(CAPTIONS, num_candidates=3, temperature=0.9, top_k=8, guidance=2.0,
                          seed=5, batch_size=batch_size, progress=False)
    np.testing.assert_array_equal(result.codes, codes)
    np.testing.assert_array_equal(result.images, images)
    assert result.images.shape == (2, 3, 16, 16, 3) and result.images.dtype == np.uint8
    assert result.scores is None and result.truncated == [False, False]
    np.testing.assert_array_equal(result.candidates, [[0, 1, 2]] * 2)
    assert len(result.pil()) == 2 and result.pil()[1][2].size == (16, 16)
  assert sorted(gen._compiled) == [(4, True), (5, True)]  # the third call compiled nothing
  assert result.timing["compile_s"] == 0 and result.timing["image_tokens_per_s"] > 0


def test_on_a_training_mesh_with_sharded_parameters_the_same_codes(gen):
  """How train_transformer.py draws its sample grids: parameters where training keeps them."""
  mesh = sharding.make_mesh(data=4, fsdp=2)
  train = transformer_training.TransformerTrainConfig(**gen.run_config["train"])
  shardings = transformer_training.state_shardings(gen.config, train, mesh).params
  drawer = generate.Generator(gen.config, jax.device_put(gen.params, shardings), gen.tokenizer,
                              gen.dvae_config, gen.dvae_params, mesh=mesh,
                              param_shardings=shardings)
  result = drawer.generate(CAPTIONS, num_candidates=3, seed=5, batch_size=3, progress=False)
  assert list(drawer._compiled) == [(8, False)]  # 3 rounded up to a whole number per device
  plain = gen.generate(CAPTIONS, num_candidates=3, seed=5, batch_size=6, progress=False)
  np.testing.assert_array_equal(result.codes, plain.codes)
  np.testing.assert_array_equal(result.images, plain.images)


def test_plain_sampling_matches_and_the_seed_decides(gen):
  settings = sampling.SampleSettings()
  _, codes = _direct(gen, CAPTIONS[:1], 2, 0, settings)
  result = gen.generate(CAPTIONS[0], num_candidates=2, progress=False)
  np.testing.assert_array_equal(result.codes, codes)
  other = gen.generate(CAPTIONS[0], num_candidates=2, seed=1, progress=False)
  assert not np.array_equal(other.codes, codes)


def test_priming_and_variations_keep_the_image_s_top_rows(gen, tmp_path):
  pixels = np.random.default_rng(0).integers(0, 256, (24, 20, 3), np.uint8)
  expected = np.asarray(dvae.encode(gen.dvae_config, gen.dvae_params,
                                    preprocess.preprocess(pixels, 16, "center")[None]))[0]
  path = tmp_path / "prime.png"
  Image.fromarray(pixels).save(path)
  results = [gen.generate(["", "a red circle"], num_candidates=2, prime_image=image,
                          prime_rows=2, seed=3, progress=False)
             for image in (pixels, str(path), path.read_bytes(), Image.open(path))]
  for result in results:
    np.testing.assert_array_equal(result.codes, results[0].codes)
    assert result.notes == []
  codes = results[0].codes
  np.testing.assert_array_equal(codes[:, :, :2], np.broadcast_to(expected[:2], (2, 2, 2, 4)))
  # The empty caption reads as every position's pad: the unconditional model's variations.
  settings = sampling.SampleSettings(prime_rows=2)
  np.testing.assert_array_equal(_direct(gen, ["", "a red circle"], 2, 3, settings, expected)[1],
                                codes)
  assert (gen.tokenizer.encode("")[0] >= gen.tokenizer.vocab_size).all()


def test_a_small_prime_image_is_enlarged_and_said_a_tiny_one_refused(gen):
  small = np.full((8, 12, 3), 200, np.uint8)
  result = gen.generate([""], prime_image=small, prime_rows=1, progress=False)
  assert result.notes == ["prime_image is 12x8 pixels: its centre square was enlarged to the "
                          "dVAE's 16x16"]
  with pytest.raises(generate.GenerationError, match="prime_image is 3x3 pixels, fewer than the "
                     "4x4 codes it becomes: pass an image of at least 16x16"):
    gen.generate([""], prime_image=np.zeros((3, 3, 3), np.uint8), prime_rows=1)


def test_reranking_keeps_the_best_scored_candidates_best_first(gen):
  class Brightness:  # scores an image by its mean pixel; sees its caption's own ids
    tokenizer = gen.tokenizer

    def score(self, images, text):
      assert len(images) == len(text) and (text < gen.tokenizer.vocab_size + 16).all()
      return images.reshape(len(images), -1).mean(axis=1).astype(np.float32)

  every = gen.generate(CAPTIONS, num_candidates=4, seed=2, batch_size=3, progress=False)
  ranked = generate.Generator(gen.config, gen.params, gen.tokenizer, gen.dvae_config,
                              gen.dvae_params, Brightness())
  result = ranked.generate(CAPTIONS, num_candidates=4, keep=2, seed=2, batch_size=3,
                           progress=False)
  means = every.images.reshape(2, 4, -1).mean(-1)
  best = np.argsort(-means, axis=1, kind="stable")[:, :2]
  np.testing.assert_array_equal(result.candidates, best)
  np.testing.assert_allclose(result.scores, np.take_along_axis(means, best, 1), rtol=1e-6)
  np.testing.assert_array_equal(result.images, np.take_along_axis(
      every.images, best[:, :, None, None, None], 1))


def test_openai_released_decoder_decodes_samples(runs, tmp_path):
  """Whole pickled dall_e modules with random weights (4x4 codes over 512) decode a model's
  samples as OpenAI's PyTorch decoder does."""
  import dall_e  # OpenAI's reference package; `make setup` installs it
  import torch

  torch.manual_seed(0)
  encoder = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512, requires_grad=False)
  decoder = dall_e.Decoder(n_hid=64, n_init=32, n_blk_per_group=1, vocab_size=512,
                           requires_grad=False)
  torch.save(encoder, tmp_path / "encoder.pkl")
  torch.save(decoder, tmp_path / "decoder.pkl")
  tiny = generate.Generator.load(runs["transformer"])
  config = dataclasses.replace(tiny.config, image_vocab_size=512)
  params = nn.unbox(transformer.init(config, jax.random.key(0)))
  dvae_config, dvae_params = generate.load_dvae(
      (str(tmp_path / "encoder.pkl"), str(tmp_path / "decoder.pkl")), config)
  assert (dvae_config.resolution, dvae_config.code_resolution) == (32, 4)
  gen = generate.Generator(config, params, tiny.tokenizer, dvae_config, dvae_params)
  result = gen.generate(CAPTIONS, num_candidates=2, progress=False)
  assert result.images.shape == (2, 2, 32, 32, 3)
  codes = torch.from_numpy(result.codes.reshape(4, 4, 4)).long()
  with torch.no_grad():
    stats = decoder(torch.nn.functional.one_hot(codes, 512).permute(0, 3, 1, 2).float())
  theirs = dall_e.unmap_pixels(torch.sigmoid(stats[:, :3])).permute(0, 2, 3, 1).numpy()
  ours = result.images.reshape(4, 32, 32, 3).astype(np.float32)
  assert np.abs(ours - np.round(theirs * 255)).max() <= 1
  # A directory holding the two files is a dVAE too; this one does not fit the 32-code run.
  with pytest.raises(generate.GenerationError, match="vocab_size 512 and 4x4 codes, the "
                     "transformer 32 and 4x4"):
    generate.Generator.load(runs["transformer"], dvae=str(tmp_path))


def test_bad_settings_are_refused_with_what_to_do(gen):
  cases = {
      "temperature must be > 0": dict(temperature=0),
      r"top_p must be in \(0, 1\]": dict(top_p=1.5),
      "top_k must be a whole number": dict(top_k=-1),
      "guidance must be a finite number": dict(guidance=float("nan")),
      "keeping 1 of 2 candidates needs a reranker": dict(num_candidates=2, keep=1),
      "prime_rows needs a prime_image": dict(prime_rows=1),
      r"prime_rows must be in 1\.\.4": dict(prime_image=np.zeros((16, 16, 3), np.uint8),
                                           prime_rows=5),
  }
  for message, settings in cases.items():
    with pytest.raises(generate.GenerationError, match=message):
      gen.generate(CAPTIONS, **settings)
  with pytest.raises(generate.GenerationError, match="a caption is empty: write one, or pass a "
                     "prime_image"):
    gen.generate(["a red circle", "  "])
  with pytest.raises(ValueError):  # a GenerationError is a ValueError
    gen.generate([])


def test_a_prime_image_that_is_not_an_image_names_its_path(gen, tmp_path):
  text = tmp_path / "notes.png"
  text.write_text("not a picture")
  with pytest.raises(generate.GenerationError, match=f"prime_image {text} is not an image"):
    gen.generate([""], prime_image=str(text), prime_rows=1)


def test_a_huge_caption_is_noted_as_a_prefix_with_its_length(gen):
  long = "a small red circle above a large blue square " * 80_000  # 3.6 MB
  result = gen.generate([long, CAPTIONS[0]], progress=False)
  assert result.truncated == [True, False]
  assert len(result.notes) == 1 and len(result.notes[0]) < 500
  assert "(3,600,000 characters)" in result.notes[0]
  assert len(result.texts[0]) < 200 and result.texts[1] == CAPTIONS[0]


def test_example_captions_come_from_the_run_s_codes(gen):
  examples = gen.example_captions(4)
  assert len(examples) == 4 and all(not held_out for _, held_out in examples)
  assert all(isinstance(c, str) and c and "\n" not in c for c, _ in examples)
  assert (gen.text_len, gen.image_size, gen.has_reranker) == (16, 16, False)
