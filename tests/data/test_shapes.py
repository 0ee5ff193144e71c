"""Tests for dalle_jax/data/shapes.py: determinism, held-out split, caption grammar, rendering."""

import collections
import itertools

import numpy as np
import pytest

from dalle_jax.data import records
from dalle_jax.data import shapes

BG = np.array(shapes.BACKGROUND)


def _names_heldout(caption: str) -> bool:
  return any(f"{c} {s}" in caption for c, s in shapes.HELDOUT_PAIRS)


@pytest.fixture(scope="module")
def train_records():
  source = shapes.ShapesSource(2000, resolution=8, seed=3, split="train")
  return [source[i] for i in range(len(source))]


# --- The source -------------------------------------------------------------------------------


def test_record_is_a_function_of_seed_split_and_index():
  a, b = shapes.ShapesSource(10, 16, seed=7), shapes.ShapesSource(10, 16, seed=7)
  for i in (0, 3, 9):
    assert a[i].captions == b[i].captions
    np.testing.assert_array_equal(a[i].image, b[i].image)
    assert a[i].meta == b[i].meta
  # Reading out of order gives the same record.
  assert a[9].captions == shapes.ShapesSource(10, 16, seed=7)[9].captions
  other = shapes.ShapesSource(10, 16, seed=8)
  assert sum(a[i].captions != other[i].captions for i in range(10)) >= 9
  assert sum(not np.array_equal(a[i].image, other[i].image) for i in range(10)) >= 9
  heldout = shapes.ShapesSource(10, 16, seed=7, split="heldout")
  assert sum(a[i].captions != heldout[i].captions for i in range(10)) >= 9


def test_record_fields():
  source = shapes.ShapesSource(5, 16, seed=0, split="heldout")
  assert len(source) == 5
  record = source[4]
  assert isinstance(record, records.RawRecord)
  assert record.key == "shapes/heldout/4"
  assert source[-1].key == "shapes/heldout/4"
  assert len(record.captions) == shapes.NUM_CAPTIONS == len(set(record.captions))
  assert record.image.dtype == np.uint8 and record.image.shape == (16, 16, 3)
  assert record.meta["split"] == "heldout"
  assert shapes.Scene.from_dict(record.meta["scene"]).to_dict() == record.meta["scene"]
  assert record.skip is None
  with pytest.raises(IndexError):
    source[5]
  with pytest.raises(IndexError):
    source[-6]
  assert len(list(source)) == 5


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="split"):
    shapes.ShapesSource(4, 16, split="test")
  with pytest.raises(ValueError, match="use 8 or more"):
    shapes.ShapesSource(4, 7)
  with pytest.raises(ValueError, match="num_examples"):
    shapes.ShapesSource(-1, 16)
  with pytest.raises(ValueError):
    shapes.Scene((("small", "red", "circle"),), relation="above")
  with pytest.raises(ValueError):
    shapes.Scene((("small", "pink", "circle"),), position="center")


def test_train_never_names_a_heldout_pair(train_records):
  objects = collections.Counter()
  kinds = collections.Counter()
  for record in train_records:
    scene = shapes.Scene.from_dict(record.meta["scene"])
    assert shapes.scene_split(scene) == "train"
    assert not any(_names_heldout(c) for c in record.captions), record.captions
    objects.update(scene.objects)
    kinds[len(scene.objects)] += 1
  # About half the scenes have one object: 1000 +- 4 sigma (sigma ~ 22).
  assert 910 < kinds[1] < 1090 and kinds[1] + kinds[2] == 2000
  # Every one of the 50 training objects appears, and nothing else does.
  assert set(objects) == set(shapes.TRAIN_OBJECTS)
  assert len(shapes.TRAIN_OBJECTS) == 50 and len(shapes.HELDOUT_OBJECTS) == 10
  for values, field in ((shapes.SIZES, "size"), (shapes.COLOURS, "colour"),
                        (shapes.SHAPES, "shape")):
    counts = collections.Counter(getattr(o, field) for o in objects.elements())
    assert set(counts) == set(values)
    assert min(counts.values()) > 0.5 * sum(counts.values()) / len(values)


def test_heldout_always_names_a_heldout_pair():
  source = shapes.ShapesSource(300, 8, seed=3, split="heldout")
  kinds = collections.Counter()
  for record in source:
    scene = shapes.Scene.from_dict(record.meta["scene"])
    assert shapes.scene_split(scene) == "heldout"
    assert all(_names_heldout(c) for c in record.captions), record.captions
    kinds[len(scene.objects)] += 1
  assert 110 < kinds[1] < 190


def test_heldout_pairs_are_declared_sensibly():
  assert len(shapes.HELDOUT_PAIRS) == 5
  colours = collections.Counter(c for c, _ in shapes.HELDOUT_PAIRS)
  kinds = collections.Counter(s for _, s in shapes.HELDOUT_PAIRS)
  assert max(colours.values()) == 1 and max(kinds.values()) == 1
  assert set(colours) <= set(shapes.COLOURS) and set(kinds) <= set(shapes.SHAPES)


def test_all_scenes_counts_and_splits():
  everything = shapes.all_scenes()
  assert len(everything) == 60 * 9 + 60 * 60 * 4 == 14940
  assert len(set(everything)) == 14940
  train, heldout = shapes.all_scenes("train"), shapes.all_scenes("heldout")
  assert len(train) == 50 * 9 + 50 * 50 * 4 == 10450
  assert len(heldout) == 14940 - 10450
  assert not set(train) & set(heldout)
  with pytest.raises(ValueError):
    shapes.all_scenes("valid")


# --- Captions ---------------------------------------------------------------------------------


def test_parse_recovers_every_paraphrase(train_records):
  for record in train_records[:300]:
    scene = shapes.Scene.from_dict(record.meta["scene"])
    for caption in record.captions:
      assert shapes.parse_caption(caption) == scene, caption


def test_every_caption_of_a_scene_parses_back():
  scenes = [shapes.Scene((("large", "orange", "star"),), position=p) for p in shapes.POSITIONS]
  scenes += [shapes.Scene((("small", "red", "circle"), ("large", "blue", "square")), relation=r)
             for r in shapes.RELATIONS]
  for scene in scenes:
    captions = shapes.all_captions(scene)
    assert len(captions) == len(set(captions)) >= 36
    assert captions[0] == shapes.canonical_caption(scene)
    for caption in captions:
      assert shapes.parse_caption(caption) == scene, caption
  assert len(shapes.ONE_OBJECT_TEMPLATES) >= 4 and len(shapes.TWO_OBJECT_TEMPLATES) >= 4


def test_canonical_captions_round_trip_for_all_scenes():
  for scene in shapes.all_scenes()[::7]:
    assert shapes.parse_caption(shapes.canonical_caption(scene)) == scene


def test_canonical_caption_text():
  one = shapes.Scene((("small", "red", "circle"),), position="top left")
  two = shapes.Scene((("small", "red", "circle"), ("large", "blue", "square")), relation="left of")
  assert shapes.canonical_caption(one) == "a small red circle in the top left corner"
  assert shapes.canonical_caption(two) == "a small red circle to the left of a large blue square"
  assert "an image of a little red circle at the top left" in shapes.all_captions(one)
  assert "a big blue square" in " ".join(shapes.all_captions(two))


def test_parse_tolerates_case_spacing_and_final_period():
  expected = shapes.Scene((("large", "green", "diamond"),), position="bottom")
  assert shapes.parse_caption("  A Big GREEN diamond   at the bottom. ") == expected
  scene = shapes.parse_caption("there is a little purple star beneath a large yellow triangle")
  assert scene == shapes.Scene((("small", "purple", "star"), ("large", "yellow", "triangle")),
                               relation="below")


@pytest.mark.parametrize("caption, message", [
    ("a cat sitting on a mat", "unknown words"),
    ("", "outside the shapes grammar"),
    ("a red circle in the center", "no template"),  # no size
    ("a small red circle", "no template"),  # no position
    ("small red circle in the center", "no template"),  # no article
    ("an small red circle in the center", "write 'a small'"),
    ("a small pink circle in the center", "unknown words"),
    ("a small red circle to the left of", "no template"),
    ("a small red circle in the top left corner to the left of a big blue star", "no template"),
])
def test_parse_rejects_text_outside_the_grammar(caption, message):
  with pytest.raises(ValueError, match=message):
    shapes.parse_caption(caption)


# --- Layout and rendering ---------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [8, 16, 32, 64, 256])
def test_render_dtype_and_shape(resolution):
  scene = shapes.Scene((("small", "red", "star"), ("large", "blue", "circle")), relation="above")
  for rng in (None, np.random.default_rng(0)):
    image = shapes.render_scene(scene, resolution, rng)
    assert image.dtype == np.uint8 and image.shape == (resolution, resolution, 3)
  np.testing.assert_array_equal(shapes.render_caption(shapes.canonical_caption(scene), resolution),
                                shapes.render_scene(scene, resolution))


@pytest.mark.parametrize("resolution", [32, 64])
def test_canonical_render_colours_the_object_centre(resolution):
  for position, (colour, shape) in zip(shapes.POSITIONS,
                                       itertools.cycle(itertools.product(shapes.COLOURS,
                                                                         shapes.SHAPES))):
    for size in shapes.SIZES:
      scene = shapes.Scene(((size, colour, shape),), position=position)
      image = shapes.render_scene(scene, resolution).astype(int)
      (box,) = shapes.layout(scene)
      row, col = int(box.y * resolution), int(box.x * resolution)
      assert np.abs(image[row, col] - shapes.RGB[colour]).max() <= 12, (scene, image[row, col])
      # Corners of the image (outside every object) are plain background.
      for r, c in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        np.testing.assert_array_equal(image[r, c], BG)
      # Only the object and its anti-aliased edge differ from the background.
      changed = np.any(image != BG, axis=-1).mean()
      assert 0.01 < changed < 0.2, (scene, changed)


def test_canonical_positions_follow_the_grid():
  res = 48
  for index, position in enumerate(shapes.POSITIONS):
    row, col = divmod(index, 3)
    for size in shapes.SIZES:
      image = shapes.render_caption(f"a {size} blue circle {shapes.POSITION_PHRASES[position][0]}",
                                    res)
      ys, xs = np.nonzero(np.all(np.abs(image.astype(int) - shapes.RGB["blue"]) <= 30, axis=-1))
      # The blue centroid lies in the named third of the image along each axis.
      assert int(3 * xs.mean() / res) == col and int(3 * ys.mean() / res) == row, (position, size)


def _centroid(image: np.ndarray, colour: str) -> np.ndarray:
  """(x, y) centroid of pixels within 30 of `colour` in every channel."""
  ys, xs = np.nonzero(np.all(np.abs(image.astype(int) - shapes.RGB[colour]) <= 30, axis=-1))
  assert len(xs) > 0, colour
  return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("relation, axis, sign", [
    ("left of", 0, -1), ("right of", 0, 1), ("above", 1, -1), ("below", 1, 1)])
def test_relations_place_the_first_object_on_the_stated_side(relation, axis, sign):
  scene = shapes.Scene((("small", "red", "circle"), ("large", "blue", "square")),
                       relation=relation)
  images = [shapes.render_scene(scene, 32)]
  images += [shapes.render_scene(scene, 32, np.random.default_rng(s)) for s in range(20)]
  for image in images:
    delta = _centroid(image, "red") - _centroid(image, "blue")
    assert sign * delta[axis] > 5  # pixels, along the relation's axis
    assert abs(delta[1 - axis]) < abs(delta[axis])
  canonical = _centroid(images[0], "red") - _centroid(images[0], "blue")
  assert abs(canonical[1 - axis]) < 0.5 and abs(abs(canonical[axis]) - 16) < 0.5


def test_large_covers_more_pixels_than_small():
  for shape in shapes.SHAPES:
    covered = {}
    for size in shapes.SIZES:
      image = shapes.render_caption(f"a {size} green {shape} in the center", 64)
      covered[size] = np.any(image != BG, axis=-1).sum()
    assert covered["large"] > 2.5 * covered["small"], (shape, covered)


def test_jittered_layouts_stay_inside_apart_and_true():
  rng = np.random.default_rng(0)
  for scene in shapes.all_scenes()[::23]:
    canonical = shapes.layout(scene)
    for _ in range(5):
      boxes = shapes.layout(scene, rng)
      for box in boxes:
        assert box.half <= 0.22 and box.half >= 0.1
        assert box.half <= box.x <= 1 - box.half and box.half <= box.y <= 1 - box.half
      if scene.position is not None:
        # The centre stays in the named grid cell.
        assert int(3 * boxes[0].x) == int(3 * canonical[0].x)
        assert int(3 * boxes[0].y) == int(3 * canonical[0].y)
        continue
      a, b = boxes
      along = 0 if scene.relation in ("left of", "right of") else 1
      sign = -1 if scene.relation in ("left of", "above") else 1
      distance = sign * ((a.x - b.x) if along == 0 else (a.y - b.y))
      assert distance >= a.half + b.half  # bounding boxes are apart along the relation's axis


def test_jitter_moves_objects_and_scales():
  scene = shapes.Scene((("large", "red", "square"),), position="center")
  boxes = [shapes.layout(scene, np.random.default_rng(s))[0] for s in range(50)]
  xs, halves = np.array([b.x for b in boxes]), np.array([b.half for b in boxes])
  assert xs.min() < 0.45 and xs.max() > 0.55
  assert halves.min() < 0.19 and halves.max() > 0.21
  assert shapes.layout(scene)[0] == shapes.Box(0.5, 0.5, 0.2)
