"""Procedural shapes: one or two coloured shapes, captions from a small grammar, pixels drawn here.

A scene is one object on a 3x3 grid ("a small red circle in the top left corner") or two objects and
a relation ("a small red circle to the left of a large blue square"). Every caption names every
attribute of every object, so `parse_caption` recovers the scene and `render_caption` draws the
ground truth. The colour-shape pairs in `HELDOUT_PAIRS` never occur in the `train` split: the
`heldout` split tests whether a model composes attributes it has only seen apart.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
import re
from typing import Any, Mapping, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from dalle_jax.data import records

SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "diamond")
# Row-major over the 3x3 grid: index // 3 is the row, index % 3 the column.
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
# The first object of a two-object scene is `relation` the second.
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = ("train", "heldout")

# Each colour and each shape at most once, so training still shows every part of a held-out pair.
HELDOUT_PAIRS = (("red", "star"), ("green", "triangle"), ("blue", "diamond"),
                 ("yellow", "circle"), ("purple", "square"))

RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
       "yellow": (240, 200, 20), "purple": (140, 60, 190), "orange": (245, 130, 20)}
BACKGROUND = (245, 245, 245)
# Side of an object's bounding box as a fraction of the image side.
EXTENT = {"small": 0.22, "large": 0.40}

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES = {
    "top left": ("in the top left corner", "at the top left", "in the top left"),
    "top": ("at the top", "at the top of the image", "in the top middle"),
    "top right": ("in the top right corner", "at the top right", "in the top right"),
    "left": ("on the left", "at the left", "on the left side"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "at the right", "on the right side"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the bottom left"),
    "bottom": ("at the bottom", "at the bottom of the image", "in the bottom middle"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the bottom right"),
}
RELATION_PHRASES = {
    "left of": ("to the left of", "on the left of", "left of"),
    "right of": ("to the right of", "on the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# The first template of each kind, with the first phrase of each slot, is the canonical caption.
ONE_OBJECT_TEMPLATES = (
    "{obj} {where}",
    "{obj} is {where}",
    "a picture of {obj} {where}",
    "an image of {obj} {where}",
    "there is {obj} {where}",
    "{where} there is {obj}",
)
TWO_OBJECT_TEMPLATES = (
    "{obj1} {rel} {obj2}",
    "{obj1} is {rel} {obj2}",
    "a picture of {obj1} {rel} {obj2}",
    "an image of {obj1} {rel} {obj2}",
    "there is {obj1} {rel} {obj2}",
)
NUM_CAPTIONS = 4  # paraphrases per record; the pipeline draws one per epoch


class Obj(NamedTuple):
  """One object; compares equal to the plain tuple `(size, colour, shape)`."""
  size: str
  colour: str
  shape: str


@dataclasses.dataclass(frozen=True)
class Scene:
  """One object and a `position` (from POSITIONS), or two objects and a `relation` (RELATIONS)."""
  objects: tuple[Obj, ...]
  position: str | None = None
  relation: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "objects", tuple(Obj(*o) for o in self.objects))
    for o in self.objects:
      if o.size not in SIZES or o.colour not in COLOURS or o.shape not in SHAPES:
        raise ValueError(f"unknown object {tuple(o)}; sizes {SIZES}, colours {COLOURS}, "
                         f"shapes {SHAPES}")
    one = len(self.objects) == 1 and self.position in POSITIONS and self.relation is None
    two = len(self.objects) == 2 and self.relation in RELATIONS and self.position is None
    if not (one or two):
      raise ValueError(f"{self}: give one object and a position from {POSITIONS}, "
                       f"or two objects and a relation from {RELATIONS}")

  def to_dict(self) -> dict[str, Any]:
    """A plain dict of builtins, for `RawRecord.meta`."""
    return {"objects": [o._asdict() for o in self.objects],
            "position": self.position, "relation": self.relation}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Scene:
    objects = tuple(Obj(o["size"], o["colour"], o["shape"]) for o in d["objects"])
    return cls(objects, position=d.get("position"), relation=d.get("relation"))


ALL_OBJECTS = tuple(Obj(*o) for o in itertools.product(SIZES, COLOURS, SHAPES))
HELDOUT_OBJECTS = tuple(o for o in ALL_OBJECTS if (o.colour, o.shape) in HELDOUT_PAIRS)
TRAIN_OBJECTS = tuple(o for o in ALL_OBJECTS if (o.colour, o.shape) not in HELDOUT_PAIRS)


def scene_split(scene: Scene) -> str:
  """The split a scene belongs to: "heldout" if any object has a held-out pair, else "train"."""
  return "heldout" if any(o in HELDOUT_OBJECTS for o in scene.objects) else "train"


def all_scenes(split: str | None = None) -> tuple[Scene, ...]:
  """Every scene of the grammar (540 one-object, 14400 two-object), optionally of one split."""
  if split is not None:
    _check_split(split)
  scenes = [Scene((o,), position=p) for o in ALL_OBJECTS for p in POSITIONS]
  scenes += [Scene((a, b), relation=r) for a in ALL_OBJECTS for b in ALL_OBJECTS for r in RELATIONS]
  return tuple(s for s in scenes if split is None or scene_split(s) == split)


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
  """A uniform one-object scene or (equally likely) a uniform two-object scene of `split`."""
  _check_split(split)
  heldout = split == "heldout"
  if rng.random() < 0.5:
    pool = HELDOUT_OBJECTS if heldout else TRAIN_OBJECTS
    return Scene((pool[rng.integers(len(pool))],), position=POSITIONS[rng.integers(len(POSITIONS))])
  pool = ALL_OBJECTS if heldout else TRAIN_OBJECTS
  while True:  # rejection keeps held-out pairs uniform; about 31% of draws are accepted
    objects = (pool[rng.integers(len(pool))], pool[rng.integers(len(pool))])
    if not heldout or any(o in HELDOUT_OBJECTS for o in objects):
      return Scene(objects, relation=RELATIONS[rng.integers(len(RELATIONS))])


# ---------------------------------------------------------------------------------------------
# Captions: generated from the templates, and parsed back with regexes built from the same ones.
# ---------------------------------------------------------------------------------------------


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _object_phrase(obj: Obj, size_word: str) -> str:
  return f"{_article(size_word)} {size_word} {obj.colour} {obj.shape}"


def all_captions(scene: Scene) -> tuple[str, ...]:
  """Every caption of the grammar that describes `scene` (36 to 60); the first is canonical."""
  if scene.position is not None:
    (obj,) = scene.objects
    return tuple(t.format(obj=_object_phrase(obj, s), where=w)
                 for t in ONE_OBJECT_TEMPLATES for s in SIZE_WORDS[obj.size]
                 for w in POSITION_PHRASES[scene.position])
  a, b = scene.objects
  return tuple(t.format(obj1=_object_phrase(a, sa), rel=r, obj2=_object_phrase(b, sb))
               for t in TWO_OBJECT_TEMPLATES for sa in SIZE_WORDS[a.size]
               for sb in SIZE_WORDS[b.size] for r in RELATION_PHRASES[scene.relation])


def canonical_caption(scene: Scene) -> str:
  """The one caption used for evaluation prompts, e.g. "a small red circle in the center"."""
  return all_captions(scene)[0]


_WORD_TO_SIZE = {w: size for size, words in SIZE_WORDS.items() for w in words}
_PHRASE_TO_POSITION = {p: pos for pos, phrases in POSITION_PHRASES.items() for p in phrases}
_PHRASE_TO_RELATION = {p: rel for rel, phrases in RELATION_PHRASES.items() for p in phrases}


def _alternatives(name: str, words) -> str:
  return f"(?P<{name}>{'|'.join(re.escape(w) for w in words)})"


def _object_regex(k: str) -> str:
  return " ".join((_alternatives(f"article{k}", ("a", "an")),
                   _alternatives(f"size{k}", _WORD_TO_SIZE), _alternatives(f"colour{k}", COLOURS),
                   _alternatives(f"shape{k}", SHAPES)))


# Templates hold only words, spaces and slots, so formatting them with regexes needs no escaping.
_ONE_OBJECT_REGEXES = tuple(
    re.compile(t.format(obj=_object_regex(""), where=_alternatives("where", _PHRASE_TO_POSITION)))
    for t in ONE_OBJECT_TEMPLATES)
_TWO_OBJECT_REGEXES = tuple(
    re.compile(t.format(obj1=_object_regex("1"), obj2=_object_regex("2"),
                        rel=_alternatives("rel", _PHRASE_TO_RELATION)))
    for t in TWO_OBJECT_TEMPLATES)
_VOCABULARY = frozenset(" ".join(
    (*ONE_OBJECT_TEMPLATES, *TWO_OBJECT_TEMPLATES, *_WORD_TO_SIZE, *COLOURS, *SHAPES,
     *_PHRASE_TO_POSITION, *_PHRASE_TO_RELATION)).split())


def _parsed_object(match: re.Match, k: str, caption: str) -> Obj:
  size_word = match[f"size{k}"]
  if match[f"article{k}"] != _article(size_word):
    raise ValueError(f"caption {caption!r}: write '{_article(size_word)} {size_word}'")
  return Obj(_WORD_TO_SIZE[size_word], match[f"colour{k}"], match[f"shape{k}"])


def parse_caption(caption: str) -> Scene:
  """The scene a caption of the grammar describes; case, spacing and a final '.' are ignored."""
  text = " ".join(caption.strip().rstrip(".").lower().split())
  for regex in _ONE_OBJECT_REGEXES:
    if match := regex.fullmatch(text):
      return Scene((_parsed_object(match, "", caption),),
                   position=_PHRASE_TO_POSITION[match["where"]])
  for regex in _TWO_OBJECT_REGEXES:
    if match := regex.fullmatch(text):
      objects = (_parsed_object(match, "1", caption), _parsed_object(match, "2", caption))
      return Scene(objects, relation=_PHRASE_TO_RELATION[match["rel"]])
  unknown = sorted({w for w in text.split() if w not in _VOCABULARY})
  why = f"unknown words {unknown}" if unknown else "no template matches this word order"
  raise ValueError(
      f"caption {caption!r} is outside the shapes grammar ({why}); captions look like "
      f"'a small red circle in the top left corner' or "
      f"'a large blue square to the left of a small green star'")


# ---------------------------------------------------------------------------------------------
# Layout and drawing.
# ---------------------------------------------------------------------------------------------

SUPERSAMPLE = 4  # draw at 4x and box-filter down, for anti-aliased edges at any resolution
_MARGIN = 0.03  # empty border, so objects stay wholly inside the image
_GAP = 0.04  # least empty space between two objects along their relation's axis
_SCALE_JITTER = 0.08  # training extents vary by +-8%
_CELL_JITTER = 0.4  # a training centre moves up to 0.4 cell from its cell centre
_TILT = 0.4  # cross-axis offset / along-axis distance, so "left of" never reads as "above"


class Box(NamedTuple):
  """Where an object goes: centre `(x, y)` and half its extent, as fractions of the image side."""
  x: float
  y: float
  half: float


def layout(scene: Scene, rng: np.random.Generator | None = None) -> tuple[Box, ...]:
  """One box per object: canonical when `rng` is None, else jittered with the scene kept true."""
  halves = [EXTENT[o.size] / 2 for o in scene.objects]
  if rng is not None:
    halves = [h * rng.uniform(1 - _SCALE_JITTER, 1 + _SCALE_JITTER) for h in halves]
  if scene.position is not None:
    return (_place_one(scene.position, halves[0], rng),)
  return _place_two(scene.relation, halves, rng)


def _place_one(position: str, half: float, rng: np.random.Generator | None) -> Box:
  row, col = divmod(POSITIONS.index(position), 3)
  lo, hi = half + _MARGIN, 1 - half - _MARGIN

  def coordinate(cell: int) -> float:
    centre = (cell + 0.5) / 3
    if rng is None:  # a large object cannot be centred in a corner cell: push it just inside
      return float(np.clip(centre, lo, hi))
    return rng.uniform(max(lo, centre - _CELL_JITTER / 3), min(hi, centre + _CELL_JITTER / 3))

  return Box(coordinate(col), coordinate(row), half)


def _place_two(relation: str, halves: list[float], rng: np.random.Generator | None
               ) -> tuple[Box, Box]:
  first_low = relation in ("left of", "above")  # the first object has the smaller coordinate
  h_low, h_high = halves if first_low else halves[::-1]
  if rng is None:
    low, high, cross_low, cross_high = 0.25, 0.75, 0.5, 0.5
  else:
    # Cut the free length into three uniform parts: before, between and after the two objects.
    slack = 1 - 2 * _MARGIN - 2 * h_low - 2 * h_high - _GAP
    cut1, cut2 = np.sort(rng.uniform(0, slack, size=2))
    low = _MARGIN + cut1 + h_low
    high = low + h_low + _GAP + (cut2 - cut1) + h_high
    offset = rng.uniform(-_TILT, _TILT) * (high - low)
    centre = rng.uniform(max(h_low + _MARGIN + offset / 2, h_high + _MARGIN - offset / 2),
                         min(1 - h_low - _MARGIN + offset / 2, 1 - h_high - _MARGIN - offset / 2))
    cross_low, cross_high = centre - offset / 2, centre + offset / 2
  boxes = [(low, cross_low, h_low), (high, cross_high, h_high)]
  if relation in ("above", "below"):  # the relation's axis is y
    boxes = [(cross, along, h) for along, cross, h in boxes]
  boxes = [Box(float(x), float(y), h) for x, y, h in boxes]
  return tuple(boxes) if first_low else tuple(boxes[::-1])


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
  angles = -np.pi / 2 + np.pi * np.arange(2 * points) / points
  radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
  star = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
  return star - (star.max(0) + star.min(0)) / 2  # centre the bounding box, not the tips


# Outlines in [-1, 1]^2 with centred bounding boxes, scaled by an object's half extent.
_POLYGONS = {
    "square": np.array([(-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)]),
    "triangle": np.array([(0.0, -0.9), (1.0, 0.9), (-1.0, 0.9)]),
    "diamond": np.array([(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)]),
    "star": _star(),
}


def _check_resolution(resolution: int):
  if resolution < 8:
    raise ValueError(f"resolution {resolution} is too small to tell shapes apart; use 8 or more "
                     f"(32 or 64 are typical)")


def render_scene(scene: Scene, resolution: int, rng: np.random.Generator | None = None
                 ) -> np.ndarray:
  """Pixels `uint8[resolution, resolution, 3]`; canonical layout when `rng` is None."""
  _check_resolution(resolution)
  side = resolution * SUPERSAMPLE
  image = Image.new("RGB", (side, side), BACKGROUND)
  draw = ImageDraw.Draw(image)
  for obj, box in zip(scene.objects, layout(scene, rng)):
    x, y, half = box.x * side, box.y * side, box.half * side
    if obj.shape == "circle":
      draw.ellipse((x - half, y - half, x + half, y + half), fill=RGB[obj.colour])
    else:
      outline = _POLYGONS[obj.shape] * half + (x, y)
      draw.polygon([tuple(p) for p in outline], fill=RGB[obj.colour])
  image = image.resize((resolution, resolution), Image.Resampling.BOX)
  return np.array(image, dtype=np.uint8)


def render_caption(caption: str, resolution: int) -> np.ndarray:
  """The ground truth `uint8[resolution, resolution, 3]` of a caption: its canonical render."""
  return render_scene(parse_caption(caption), resolution)


# ---------------------------------------------------------------------------------------------
# The source.
# ---------------------------------------------------------------------------------------------


def _check_split(split: str):
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}")


class ShapesSource:
  """Random-access `RawRecord`s; record i depends only on (seed, split, i).

  Each record holds `NUM_CAPTIONS` distinct paraphrases of one scene, its pixels
  `uint8[resolution, resolution, 3]` in a jittered layout, and `meta={"scene", "split"}`.
  """

  def __init__(self, num_examples: int, resolution: int, seed: int = 0, split: str = "train"):
    _check_split(split)
    _check_resolution(resolution)
    if num_examples < 0:
      raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    self.num_examples, self.resolution, self.seed, self.split = (
        num_examples, resolution, seed, split)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> records.RawRecord:
    i = operator.index(index)
    if i < 0:
      i += self.num_examples
    if not 0 <= i < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} shapes records")
    rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i])
    scene = sample_scene(rng, self.split)
    captions = all_captions(scene)
    picks = rng.choice(len(captions), size=NUM_CAPTIONS, replace=False)
    return records.RawRecord(
        key=f"shapes/{self.split}/{i}",
        captions=tuple(captions[j] for j in picks),
        image=render_scene(scene, self.resolution, rng),
        meta={"scene": scene.to_dict(), "split": self.split})

  def __repr__(self) -> str:
    return (f"ShapesSource(num_examples={self.num_examples}, resolution={self.resolution}, "
            f"seed={self.seed}, split={self.split!r})")
