"""Tests for `dalle_jax/evaluation/judge.py` (the judges), `dalle_jax/evaluation/judge.py` and
`experiments/eval_zero_shot.py` (end to end on a 2-step transformer and dVAE): ground truth
passes, one changed attribute fails on exactly that attribute, blur and noise pass, blank images fail, emoji variants retrieve themselves."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from conftest import CACHE_ENV, REPO
from dalle_jax import generate
from dalle_jax.data import emoji, shapes
from dalle_jax.evaluation import judge, zero_shot

EXPERIMENTS = os.path.join(REPO, "experiments")
CONFIGS = os.path.join(EXPERIMENTS, "configs")
ENV = {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu"}
HAVE_EMOJI = all(map(os.path.isfile, (emoji.DEFAULT_TEST_PATH, emoji.DEFAULT_FONT_PATH)))
needs_emoji = pytest.mark.skipif(not HAVE_EMOJI, reason=f"emoji data: {emoji.INSTALL_HINT}")


def _scenes(count: int, seed: int) -> list[shapes.Scene]:
  """Random scenes, alternately training and held-out, about half with two objects."""
  rng = np.random.default_rng(seed)
  return [shapes.sample_scene(rng, shapes.SPLITS[i % 2]) for i in range(count)]


def _judged(scenes, render, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return judge.summarize([judge.judge_shapes(render(s, rng), s) for s in scenes])


def _gaussian(radius: float):
  return lambda image: np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def _down_up(image: np.ndarray) -> np.ndarray:
  """Half the resolution and back, bilinear both ways: a blur like a dVAE's."""
  side = image.shape[0]
  small = Image.fromarray(image).resize((side // 2, side // 2), Image.Resampling.BILINEAR)
  return np.asarray(small.resize((side, side), Image.Resampling.BILINEAR))


# ---------------------------------------------------------------------------------------------
# Shapes: the judge.
# ---------------------------------------------------------------------------------------------


def test_shapes_kept_names_the_shape_a_reconstruction_lost():
  scenes = [shapes.parse_caption(c) for c in (
      "a small red star to the left of a large blue square", "a small green star at the top",
      "a large red star in the center")]
  truths = np.stack([shapes.render_scene(s, 32) for s in scenes])
  assert judge.shapes_kept(scenes, truths) == {
      "large square": {"kept": 1.0, "count": 1}, "large star": {"kept": 1.0, "count": 1},
      "small star": {"kept": 1.0, "count": 2}}
  # Small stars drawn as circles, as the shapes demo's dVAE does.
  dots = [shapes.Scene(tuple(o._replace(shape="circle") if o.size == "small" else o
                             for o in s.objects), s.position, s.relation) for s in scenes]
  drawn = np.stack([shapes.render_scene(s, 32) for s in dots])
  kept = judge.shapes_kept(scenes, drawn)
  assert kept["small star"] == {"kept": 0.0, "count": 2}
  assert kept["large star"]["kept"] == kept["large square"]["kept"] == 1.0


def test_detects_the_renderers_objects_where_it_put_them():
  scene = shapes.parse_caption("a large blue diamond to the left of a small yellow star")
  blobs = judge.detect_objects(shapes.render_scene(scene, 32))
  assert [(b.colour, b.shape, b.size) for b in blobs] == [
      ("blue", "diamond", "large"), ("yellow", "star", "small")]
  for blob, box in zip(blobs, shapes.layout(scene)):
    # Box centres within a third of a pixel, extents within 10% (measured: 1% to 7% over).
    assert abs(blob.x - box.x) < 1 / 96 and abs(blob.y - box.y) < 1 / 96
    assert blob.extent == pytest.approx(2 * box.half, rel=0.1)
    assert blob.fit > 0.8
  assert judge.relation_of(*blobs) == "left of"


def test_ground_truth_renders_are_judged_right():
  """Canonical renders of captions and jittered training-style renders, one and two objects, both
  splits, at the demo's 32 px: all 160 judged right (measured 1.000; the margin allows a few)."""
  scenes = _scenes(80, seed=0)
  assert {len(s.objects) for s in scenes} == {1, 2}
  canonical = _judged(scenes, lambda s, _: shapes.render_caption(shapes.canonical_caption(s), 32))
  jittered = _judged(scenes, lambda s, rng: shapes.render_scene(s, 32, rng))
  for summary in (canonical, jittered):
    assert summary["accuracy"] >= 0.98, summary
    assert min(summary["attributes"].values()) >= 0.98
    assert summary["count"] == 80
    assert summary["attribute_counts"]["position"] + summary["attribute_counts"]["relation"] == 80
  # At 64 px too, through every template the renderer draws.
  assert _judged(scenes[:20], lambda s, rng: shapes.render_scene(s, 64, rng))["accuracy"] == 1.0


def _other(rng, values, value):
  choices = [v for v in values if v != value]
  return choices[rng.integers(len(choices))]


def _changed(scene: shapes.Scene, attribute: str, rng) -> shapes.Scene:
  """The scene with one attribute of one object (or its position or relation) changed."""
  if attribute in judge.OBJECT_ATTRIBUTES:
    objects = list(scene.objects)
    k = rng.integers(len(objects))
    values = {"colour": shapes.COLOURS, "shape": shapes.SHAPES, "size": shapes.SIZES}[attribute]
    objects[k] = objects[k]._replace(
        **{attribute: _other(rng, values, getattr(objects[k], attribute))})
    return dataclasses.replace(scene, objects=tuple(objects))
  if attribute == "position":
    return dataclasses.replace(scene, position=_other(rng, shapes.POSITIONS, scene.position))
  return dataclasses.replace(scene, relation=_other(rng, shapes.RELATIONS, scene.relation))


def test_a_changed_attribute_is_judged_wrong_and_only_it():
  """Render a scene with one attribute changed, judge it against the unchanged caption: that
  attribute is wrong every time (measured 160/160) and nothing else is (0 of 640 wrong)."""
  rng = np.random.default_rng(1)
  wrong, others = {}, []
  for scene in _scenes(40, seed=1):
    kind = "position" if scene.position else "relation"
    for attribute in (*judge.OBJECT_ATTRIBUTES, kind):
      if kind == "relation" and scene.objects[0] == scene.objects[1]:
        continue  # two equal objects: "A left of B" drawn as "A right of B" is still right
      image = shapes.render_scene(_changed(scene, attribute, rng), 32, rng)
      verdict = judge.judge_shapes(image, scene)
      wrong.setdefault(attribute, []).append(not verdict[attribute] and not verdict["all"])
      others += [ok for a, ok in verdict.items() if a not in (attribute, "all")]
  assert all(all(v) for v in wrong.values()), {a: sum(v) for a, v in wrong.items()}
  assert sum(len(v) for v in wrong.values()) >= 150
  assert np.mean(others) >= 0.99


def test_named_changes():
  caption = "a small red circle in the top left corner"
  assert judge.judge_shapes(shapes.render_caption(caption, 32), caption)["all"]
  for changed, attribute in (("a small blue circle in the top left corner", "colour"),
                             ("a small red square in the top left corner", "shape"),
                             ("a large red circle in the top left corner", "size"),
                             ("a small red circle in the center", "position"),
                             ("a small red circle to the left of a small red circle", "count")):
    verdict = judge.judge_shapes(shapes.render_caption(changed, 32), caption)
    assert not verdict[attribute] and not verdict["all"], (changed, verdict)
  pair = "a small red circle to the left of a large blue square"
  swapped = "a small red circle to the right of a large blue square"
  assert not judge.judge_shapes(shapes.render_caption(swapped, 32), pair)["relation"]
  assert judge.judge_shapes(shapes.render_caption(pair, 32), pair)["all"]


def test_blurred_and_noisy_renders_still_pass():
  """dVAE outputs are blurry. Measured on these 40 scenes: Gaussian blur of radius 0.8 px at
  32 px and a 2x down-and-up at 64 px pass 1.000; noise of sd 15 passes 1.000. A 2x down-and-up
  at 32 px leaves a small star 3.5 px wide, a blob: only shape suffers (measured 0.90)."""
  scenes = _scenes(40, seed=2)
  blurred = _judged(scenes, lambda s, rng: _gaussian(0.8)(shapes.render_scene(s, 32, rng)))
  assert blurred["accuracy"] >= 0.98, blurred
  assert _judged(scenes[:20], lambda s, rng: _down_up(shapes.render_scene(s, 64, rng)))[
      "accuracy"] >= 0.95

  def noisy(scene, rng):
    image = shapes.render_scene(scene, 32, rng) + rng.normal(0, 15, (32, 32, 3))
    return np.clip(image, 0, 255).astype(np.uint8)
  assert _judged(scenes, noisy)["accuracy"] >= 0.98

  coarse = _judged(scenes, lambda s, rng: _down_up(shapes.render_scene(s, 32, rng)))
  assert coarse["attributes"]["shape"] >= 0.75, coarse
  assert min(v for a, v in coarse["attributes"].items() if a != "shape") >= 0.98, coarse


def test_blank_and_wrong_images_fail():
  captions = [shapes.canonical_caption(s) for s in _scenes(10, seed=3)]
  blank = np.broadcast_to(np.array(shapes.BACKGROUND, np.uint8), (32, 32, 3))
  white, black = np.full((32, 32, 3), 255, np.uint8), np.zeros((32, 32, 3), np.uint8)
  for caption in captions:
    for image in (blank, white):  # nothing drawn: no attribute is there
      verdict = judge.judge_shapes(image, caption)
      assert not any(verdict.values()), (caption, verdict)
    # All black is one huge object of no palette colour.
    verdict = judge.judge_shapes(black, caption)
    assert not verdict["colour"] and not verdict["all"]
  assert judge.detect_objects(blank) == judge.detect_objects(white) == []
  # A black square is an object of no palette colour: counted, but never the right colour.
  black = blank.copy()
  black[8:20, 8:20] = 0
  (blob,) = judge.detect_objects(black)
  assert blob.colour is None and blob.shape == "square"


def test_chance_is_low_and_the_summary_counts():
  scenes = _scenes(20, seed=4)
  chance = judge.shapes_chance(scenes, 32, draws=4, seed=0)
  assert chance["count"] == 80
  # Measured: 0.000 with every attribute right; count 0.50 (half the draws have one object),
  # colour 0.075.
  assert chance["accuracy"] <= 0.05
  assert 0.3 <= chance["attributes"]["count"] <= 0.7
  assert chance["attributes"]["colour"] <= 0.4
  verdicts = [{"count": True, "colour": True, "shape": False, "size": True, "position": True,
               "all": False},
              {"count": True, "colour": True, "shape": True, "size": True, "relation": True,
               "all": True}]
  summary = judge.summarize(verdicts)
  assert summary["accuracy"] == 0.5 and summary["count"] == 2
  assert summary["attributes"]["shape"] == 0.5 and summary["attributes"]["position"] == 1.0
  assert summary["attribute_counts"] == {"count": 2, "colour": 2, "shape": 2, "size": 2,
                                         "position": 1, "relation": 1}


# ---------------------------------------------------------------------------------------------
# Emoji: the nearest variant.
# ---------------------------------------------------------------------------------------------

# Five skin tones (Noto's), and two "genders" that differ by a band of hair.
TONES = ((247, 222, 206), (243, 210, 162), (213, 171, 136), (175, 126, 87), (124, 83, 62))


def _face(tone, hair: bool, side: int = 64) -> np.ndarray:
  image = Image.new("RGB", (side, side), "white")
  draw = ImageDraw.Draw(image)
  s = side / 64
  draw.ellipse((10 * s, 12 * s, 54 * s, 58 * s), fill=tone)
  draw.ellipse((22 * s, 28 * s, 27 * s, 34 * s), fill="black")
  draw.ellipse((37 * s, 28 * s, 42 * s, 34 * s), fill="black")
  if hair:
    draw.rectangle((10 * s, 8 * s, 54 * s, 20 * s), fill=(90, 50, 20))
  return np.asarray(image)


def test_synthetic_variants_retrieve_themselves_through_noise_and_blur():
  variants = np.stack([_face(t, h) for h in (False, True) for t in TONES])
  rng = np.random.default_rng(0)
  for k, image in enumerate(variants):
    assert judge.nearest_variant(image, variants) == k
    noisy = np.clip(image + rng.normal(0, 25, image.shape), 0, 255).astype(np.uint8)
    assert judge.nearest_variant(noisy, variants) == k
    assert judge.nearest_variant(_down_up(image), variants) == k
    assert judge.variant_distances(image, variants)[k] == 0
  # Another face altogether is far from all of them.
  assert judge.variant_distances(_face((90, 200, 90), False), variants).min() > 100


@needs_emoji
def test_real_variants_retrieve_themselves_and_tone_siblings():
  entries = emoji.load_emoji_entries()
  by_name = {e.name: e for e in entries}
  families = emoji.group_by_family(entries)
  hand = by_name["waving hand: medium skin tone"]
  tones = judge.tone_siblings(hand, families[hand.family])
  assert [e.name for e in tones] == [f"waving hand: {t}" for t in emoji.SKIN_TONES]
  assert judge.tone_siblings(by_name["waving hand"], families["waving hand"]) == []
  coder = by_name["woman technologist: dark skin tone"]
  assert {e.variant for e in judge.tone_siblings(coder, families[coder.family])} == {
      f"woman, {t}" for t in emoji.SKIN_TONES}
  rng = np.random.default_rng(0)
  heldout = [e for e in entries if e.heldout]
  for entry in [heldout[i] for i in rng.choice(len(heldout), 8, replace=False)]:
    members = families[entry.family]
    variants = np.stack([emoji.render_emoji(m.sequence, 32) for m in members])
    k = members.index(entry)
    noisy = np.clip(variants[k] + rng.normal(0, 25, variants[k].shape), 0, 255).astype(np.uint8)
    assert judge.nearest_variant(variants[k], variants) == k
    assert judge.nearest_variant(noisy, variants) == k, entry.name


# ---------------------------------------------------------------------------------------------
# The script, end to end on 2-step runs (random samples: only the shape of the results counts).
# ---------------------------------------------------------------------------------------------


def _start(script: str, *flags: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, os.path.join(EXPERIMENTS, script), *flags], env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ok(process: subprocess.Popen) -> str:
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-3000:]
  return out


@pytest.fixture(scope="module")
def runs(tiny_runs):
  """A 2-step tiny transformer whose config names a 2-step tiny dVAE (16 px, 4x4 codes), and a
  2-step reranker."""
  return tiny_runs


def _check_fractions(tree):
  for key, value in tree.items():
    if isinstance(value, dict):
      _check_fractions(value)
    elif key.endswith("accuracy") or key == "tone_chance":
      assert 0 <= value <= 1, (key, value)


def test_script_writes_the_results(runs, tmp_path):
  out, grid = tmp_path / "results" / "shapes.json", tmp_path / "grid.png"
  printed = _ok(_start("eval_zero_shot.py", f"--transformer_workdir={runs['transformer']}",
                       "--dataset=shapes", "--num_captions=3", "--samples_per_caption=2",
                       "--batch_size=4", "--top_k=8", "--chance_draws=2", f"--out={out}",
                       f"--grid={grid}", "--candidates=3", f"--reranker={runs['reranker']}"))
  assert "heldout" in printed and "chance" in printed and "all 3 candidates" in printed
  with open(out) as f:
    results = json.load(f)
  assert results["dataset"] == "shapes" and results["resolution"] == 16
  assert results["settings"]["top_k"] == 8 and results["samples_per_caption"] == 2
  for split in ("heldout", "train"):
    r = results[split]
    assert r["count"] == 3 * 2 and r["chance"]["count"] == 3 * 2
    assert r["without_reranking"]["count"] == 3 * 3  # every candidate
    assert r["judge_on_ground_truth"]["count"] == r["judge_on_dvae_reconstructions"]["count"] == 3
    assert r["judge_on_ground_truth"]["accuracy"] >= 2 / 3  # 16 px: small shapes are 3.5 px
    kept = r["judge_on_dvae_reconstructions"]["shapes_kept"]
    assert sum(k["count"] for k in kept.values()) == 1 + 2 * 2  # one one-object, two two-object
    assert set(r["attributes"]) == set(judge.ATTRIBUTES)
    assert r["attribute_counts"]["position"] == 2 and r["attribute_counts"]["relation"] == 4
    assert len(r["captions"]) == 3 and all(len(c["verdicts"]) == 2 for c in r["captions"])
    splits = {shapes.scene_split(shapes.parse_caption(c["caption"])) for c in r["captions"]}
    assert splits == {split}
  assert results["heldout_accuracy"] == results["heldout"]["accuracy"]
  assert results["chance_accuracy"] == results["heldout"]["chance"]["accuracy"]
  _check_fractions(results)
  assert Image.open(grid).size[0] > 2 * 128


def test_evaluate_refuses_reranking_without_a_reranker(runs):
  gen = generate.Generator.load(runs["transformer"])
  with pytest.raises(generate.GenerationError, match="reranking 4 candidates needs .* a reranker"):
    zero_shot.evaluate(gen, num_captions=1, samples_per_caption=2, candidates=4)
  with pytest.raises(generate.GenerationError, match="num_captions 9000 needs 4500 heldout"):
    zero_shot.evaluate(gen, num_captions=9000)


@needs_emoji
def test_evaluate_emoji_in_process(runs):
  results = zero_shot.evaluate(generate.Generator.load(runs["transformer"]), "emoji",
                                    num_captions=2, samples_per_caption=2, batch_size=4, seed=1,
                                    progress=False)
  for split in ("heldout", "train"):
    r = results[split]
    assert r["count"] == 4 and len(r["captions"]) == 2 and "dvae_reconstruction_accuracy" in r
    assert 0 < r["chance"]["accuracy"] <= 0.5  # every family has two or more variants
    heldout = {e.name: e.heldout for e in emoji.load_emoji_entries()}
    assert {heldout[c["caption"]] for c in r["captions"]} == {split == "heldout"}
  json.dumps(results)  # plain JSON
  _check_fractions(results)
