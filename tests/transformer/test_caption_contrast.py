"""dalle_jax/transformer/caption_contrast.py: near misses one attribute away, the transformer's
log-likelihood equal to its training loss, scores that are a posterior over the caption and its
near misses at any batch size, and a Generator that keeps the best-scored candidates."""

import numpy as np
import pytest

from dalle_jax import generate
from dalle_jax.data import shapes
from dalle_jax.transformer import caption_contrast
from dalle_jax.transformer import model as transformer


def _differences(a: shapes.Scene, b: shapes.Scene) -> int:
  """How many attributes (per object size, colour, shape; the place) differ."""
  if len(a.objects) != len(b.objects):
    return 99
  changed = sum(x != y for p, q in zip(a.objects, b.objects) for x, y in zip(p, q))
  return changed + ((a.position, a.relation) != (b.position, b.relation))


@pytest.mark.parametrize("caption, count", [
    ("a small red circle in the top left corner", 4 + 1 + 8),  # shapes, size, positions
    ("a large blue square to the left of a small green star", 2 * (4 + 1) + 3),
])
def test_near_misses_are_the_captions_one_attribute_away(caption, count):
  scene = shapes.parse_caption(caption)
  misses = caption_contrast.shapes_near_misses(caption)
  assert len(misses) == len(set(misses)) == count
  assert all(_differences(scene, shapes.parse_caption(m)) == 1 for m in misses)
  # Never the colour: colour is what a contrastive batch already separates.
  assert all(a.colour == b.colour for m in misses
             for a, b in zip(scene.objects, shapes.parse_caption(m).objects))


def test_a_caption_outside_the_grammar_has_no_near_misses():
  assert caption_contrast.shapes_near_misses("a photo of a cat") == []
  assert caption_contrast.shapes_near_misses("") == []


@pytest.fixture(scope="module")
def gen(tiny_runs):
  return generate.Generator.load(tiny_runs["transformer"])


def _ids(gen, captions):
  return np.stack([gen.tokenizer.encode(c)[0] for c in captions])


def test_log_likelihood_is_the_training_image_loss(gen):
  captions = ["a small red circle at the top", "a large blue square below a small green star"]
  text = _ids(gen, captions)
  codes = np.random.default_rng(0).integers(0, gen.config.image_vocab_size,
                                            (2, gen.config.image_size, gen.config.image_size))
  contrast = caption_contrast.CaptionContrast(gen.config)
  values = contrast.log_likelihoods(gen.params, text, codes)
  for i in range(2):
    text_logits, image_logits = transformer.Transformer(gen.config).apply(
        {"params": gen.params}, text[i:i + 1], codes[i:i + 1])
    _, metrics = transformer.dalle_loss(gen.config, text_logits, image_logits, text[i:i + 1],
                                        codes[i:i + 1])
    np.testing.assert_allclose(values[i], -metrics["image_loss"] * gen.config.image_len,
                               rtol=1e-5)


def test_scores_are_a_posterior_over_the_caption_and_its_near_misses(gen):
  caption = "a large blue square to the left of a small green star"
  options = [caption] + caption_contrast.shapes_near_misses(caption)
  ids = _ids(gen, options)
  codes = np.random.default_rng(1).integers(0, gen.config.image_vocab_size,
                                            (1, gen.config.image_size, gen.config.image_size))
  scores = []
  for batch_size in (256, 5):
    contrast = caption_contrast.CaptionContrast(gen.config, batch_size=batch_size)
    # Each option in turn as the caption, the rest as its alternatives.
    scores.append(np.array([
        contrast.score(gen.params, ids[i:i + 1], codes, [np.delete(ids, i, axis=0)])[0]
        for i in range(len(options))]))
  np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5, atol=1e-6)
  assert (scores[0] <= 0).all()
  np.testing.assert_allclose(np.exp(scores[0]).sum(), 1.0, rtol=1e-5)
  alone = contrast.score(gen.params, ids[:1], codes, [ids[:0]])
  np.testing.assert_array_equal(alone, [0.0])


def test_generator_keeps_the_candidates_the_contrast_scores_best(gen, tiny_runs):
  captions = ["a small red circle at the top", "a large blue square below a small green star"]
  every = gen.generate(captions, num_candidates=4, seed=3, batch_size=3, progress=False)
  ranked = generate.Generator.load(tiny_runs["transformer"], near_misses="shapes")
  assert ranked.has_reranker
  result = ranked.generate(captions, num_candidates=4, keep=2, seed=3, batch_size=3,
                           progress=False)
  contrast = caption_contrast.CaptionContrast(gen.config)
  expected = np.stack([
      contrast.score(gen.params, _ids(gen, [c] * 4), every.codes[i],
                     [_ids(gen, caption_contrast.shapes_near_misses(c))] * 4)
      for i, c in enumerate(captions)])
  best = np.argsort(-expected, axis=1, kind="stable")[:, :2]
  np.testing.assert_array_equal(result.candidates, best)
  np.testing.assert_allclose(result.scores, np.take_along_axis(expected, best, 1), rtol=1e-5)
  np.testing.assert_array_equal(result.codes, np.take_along_axis(
      every.codes, best[:, :, None, None], 1))


def test_captions_without_near_misses_are_noted_and_both_rerankers_refused(gen, tiny_runs):
  ranked = generate.Generator.load(tiny_runs["transformer"], near_misses="shapes")
  result = ranked.generate(["two blue squares"], num_candidates=2, keep=1, progress=False)
  assert any("no near misses" in note for note in result.notes)
  assert result.scores.tolist() == [[0.0]] and result.candidates.tolist() == [[0]]
  with pytest.raises(generate.GenerationError, match="not both"):
    generate.Generator.load(tiny_runs["transformer"], reranker=tiny_runs["reranker"],
                            near_misses="shapes")
  with pytest.raises(generate.GenerationError, match="is not one of"):
    generate.Generator.load(tiny_runs["transformer"], near_misses="emoji")
