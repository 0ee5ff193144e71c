"""Zero-shot judging: does a generated image show what its caption says? NumPy and PIL only.

Shapes: every caption names every attribute, so an image is judged against the grammar itself.
`detect_objects` finds the coloured blobs (each pixel is read as a blend of the background and one
palette colour, which survives anti-aliasing and dVAE blur), and fits each blob with the
renderer's own outlines of every shape, placed at the blob's centroid and scaled to its area: the
best fit gives the shape, its scale the size and its box the position. `judge_shapes` matches the
blobs to the captioned objects and says, per attribute, whether the image has it.

Emoji: a sample is right when, of its family's variants (skin tones, genders) drawn by the
renderer, the nearest to it is its own caption's (`nearest_variant`).
"""

from __future__ import annotations

import functools
import itertools
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageFilter

from dalle_jax.data import emoji, shapes

# ---------------------------------------------------------------------------------------------
# Pixels: each one a blend of the background and one palette colour (or of no palette colour).
# ---------------------------------------------------------------------------------------------

_BACKGROUND = np.array(shapes.BACKGROUND, np.float32)
_PALETTE = np.array([shapes.RGB[c] for c in shapes.COLOURS], np.float32) - _BACKGROUND  # [6, 3]
OTHER = len(shapes.COLOURS)  # the colour index of a pixel far from every palette colour
# A pixel is an object's when at least half of it is the colour (anti-aliased edges are halves).
_MIN_ALPHA = 0.5
# Farther than this (0-255 units) from every background-to-colour line: no palette colour
# (grey is 63 from green's line; the closest palette lines, orange and yellow, lie 70 apart).
_MAX_RESIDUAL = 50.0
# Up to twice as far from the background as a palette colour (darker, more saturated) is it.
_MAX_ALPHA = 2.0


def colour_maps(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per pixel the nearest palette colour and how much of it there is.

  Args:
    image: uint8[H, W, 3].

  Returns:
    int32[H, W] colour index into `shapes.COLOURS` (`OTHER` for coloured pixels off the palette,
    -1 for background) and float32[H, W] alpha, the pixel's fraction of that colour in [0, 1]
    (for `OTHER` the distance from the background over the least distinct palette colour's).
  """
  offset = np.asarray(image, np.float32)[..., :3] - _BACKGROUND
  alphas = np.clip(offset @ _PALETTE.T / (_PALETTE ** 2).sum(1), 0, _MAX_ALPHA)  # [H, W, 6]
  residuals = np.linalg.norm(offset[..., None, :] - alphas[..., None] * _PALETTE, axis=-1)
  colour = residuals.argmin(-1)
  alpha = np.clip(np.take_along_axis(alphas, colour[..., None], -1)[..., 0], 0, 1)
  residual = residuals.min(-1)
  off_palette = residual > _MAX_RESIDUAL
  least_distinct = np.linalg.norm(_PALETTE, axis=-1).min()
  alpha = np.where(off_palette, np.clip(np.linalg.norm(offset, axis=-1) / least_distinct, 0, 1),
                   alpha)
  colour = np.where(off_palette, OTHER, colour)
  return np.where(alpha >= _MIN_ALPHA, colour, -1).astype(np.int32), alpha.astype(np.float32)


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
  """The 8-connected regions of `bool[H, W]`, each as its own bool[H, W] mask, largest first."""
  h, w = mask.shape
  labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
  while True:  # every pixel takes its neighbourhood's largest label until nothing changes
    padded = np.pad(labels, 1)
    spread = np.max([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
    spread = np.where(mask, spread, 0)
    if np.array_equal(spread, labels):
      break
    labels = spread
  regions = [labels == label for label in np.unique(labels[mask])]
  return sorted(regions, key=lambda r: -r.sum())


# ---------------------------------------------------------------------------------------------
# Shapes: the renderer's outlines as templates.
# ---------------------------------------------------------------------------------------------

_TEMPLATE_SIDE = 256  # pixels of the one large render each template is resampled from
_TEMPLATE_HALF = shapes.EXTENT["large"] / 2  # a centred large object's box: 0.5 +- this
_SUPERSAMPLE = 4  # template coverage is averaged over 4x4 points per pixel
# Fits tried per shape around the centroid-and-area estimate: scales, and shifts in pixels.
_SCALES = (0.9, 1.0, 1.1)
_SHIFTS = (-0.5, 0.0, 0.5)
# Templates are also blurred by these Gaussian radii (pixels), to fit blurry decoder outputs.
_BLURS = (0.0, 0.7, 1.4)
_RING = 2  # pixels around a blob whose faint colour still counts towards its area
# Boxes of the two sizes are 0.22 and 0.40 of the side (+-8% when jittered): split between.
SIZE_THRESHOLD = float(np.sqrt(shapes.EXTENT["small"] * shapes.EXTENT["large"]))
# A blob smaller than this fraction of the smallest small object is noise, not an object.
_MIN_OBJECT_FRACTION = 0.3
_MAX_BLOBS = 4  # the largest blobs considered when matching (captions name at most two objects)


class _Template(NamedTuple):
  coverage: np.ndarray  # float32[side, side], the shape drawn with box centre 0.5, half 0.2
  fill: float  # its area over its box's area
  offset: np.ndarray  # float[2] (x, y): its centroid minus its box centre, in half extents


@functools.cache
def _template(shape: str) -> _Template:
  scene = shapes.Scene((shapes.Obj("large", "red", shape),), position="center")
  image = shapes.render_scene(scene, _TEMPLATE_SIDE)
  _, coverage = colour_maps(image)
  side, half = _TEMPLATE_SIDE, _TEMPLATE_HALF
  centres = (np.arange(side) + 0.5) / side
  mass = coverage.sum()
  offset = np.array([(coverage.sum(0) * centres).sum(), (coverage.sum(1) * centres).sum()])
  return _Template(coverage, float(mass / (2 * half * side) ** 2), (offset / mass - 0.5) / half)


def _coverages(shape: str, resolution: int, boxes: np.ndarray) -> np.ndarray:
  """The shape's coverage float32[N, res, res] in each box (x, y, half) of float[N, 3]."""
  template = _template(shape)
  points = (np.arange(resolution * _SUPERSAMPLE) + 0.5) / (resolution * _SUPERSAMPLE)

  def indices(centre):  # [N] -> int[N, points] rows or columns of the large render
    position = 0.5 + _TEMPLATE_HALF * (points - centre[:, None]) / boxes[:, 2:3]
    return np.clip(np.floor(position * _TEMPLATE_SIDE), 0, _TEMPLATE_SIDE - 1).astype(np.int32)

  # The large render's border is background, so indices clipped to it read zero coverage.
  fine = template.coverage[indices(boxes[:, 1])[:, :, None], indices(boxes[:, 0])[:, None, :]]
  n, s = len(boxes), _SUPERSAMPLE
  return fine.reshape(n, resolution, s, resolution, s).mean((2, 4))


@functools.cache
def _blur_matrix(resolution: int, sigma: float) -> np.ndarray:
  """float32[res, res] that blurs a column by a Gaussian (mass past the border is lost)."""
  if sigma == 0:
    return np.eye(resolution, dtype=np.float32)
  offsets = np.arange(resolution)[:, None] - np.arange(resolution)[None, :]
  weights = np.exp(-0.5 * (offsets / sigma) ** 2)
  return (weights / weights.sum(0, keepdims=True)).astype(np.float32)


def _soft_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Fuzzy intersection over union of float[H, W] against float[N, H, W] -> float[N]."""
  return np.minimum(a, b).sum((1, 2)) / np.maximum(np.maximum(a, b).sum((1, 2)), 1e-6)


class Blob(NamedTuple):
  """One detected object; `x`, `y` (its box centre) and `extent` are fractions of the side."""
  colour: str | None  # a name of `shapes.COLOURS`, None for a colour off the palette
  shape: str
  size: str
  x: float
  y: float
  extent: float
  mass: float  # its area in pixels, edges counted by their alpha
  fit: float  # the soft IoU of the best-fitting outline


def _fit(soft: np.ndarray) -> tuple[str, float, float, float, float]:
  """The best (shape, box x, box y, half, IoU) for a blob's float[res, res] coverage."""
  resolution = soft.shape[0]
  centres = (np.arange(resolution) + 0.5) / resolution
  mass = soft.sum()
  cx, cy = (soft.sum(0) * centres).sum() / mass, (soft.sum(1) * centres).sum() / mass
  best = None
  for shape in shapes.SHAPES:
    template = _template(shape)
    half = np.sqrt(mass / template.fill) / (2 * resolution)
    boxes = np.array([
        (cx - template.offset[0] * half * scale + dx / resolution,
         cy - template.offset[1] * half * scale + dy / resolution, half * scale)
        for scale in _SCALES for dx in _SHIFTS for dy in _SHIFTS])
    coverages = _coverages(shape, resolution, boxes)
    for sigma in _BLURS:
      blur = _blur_matrix(resolution, sigma)
      ious = _soft_iou(soft, blur @ coverages @ blur.T)
      i = int(ious.argmax())
      if best is None or ious[i] > best[-1]:
        best = (shape, *boxes[i], float(ious[i]))
  return best


def min_object_mass(resolution: int) -> float:
  """Pixels below which a blob is noise: a fraction of the smallest small object's area."""
  smallest = min(_template(s).fill for s in shapes.SHAPES)
  return _MIN_OBJECT_FRACTION * smallest * (shapes.EXTENT["small"] * resolution) ** 2


def detect_objects(image: np.ndarray) -> list[Blob]:
  """The objects of a shapes image `uint8[H, H, 3]`, largest first (blobs of one colour each)."""
  if image.ndim != 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f"expected a square uint8[H, H, 3] image, got shape {image.shape}")
  colour, alpha = colour_maps(image)
  offset = np.asarray(image, np.float32)[..., :3] - _BACKGROUND
  regions = [r for c in np.unique(colour[colour >= 0])
             for r in connected_components(colour == c)]
  taken = np.any(regions, axis=0) if regions else np.zeros(colour.shape, bool)
  blobs = []
  for region in regions:
    if region.sum() < min_object_mass(image.shape[0]):
      continue
    c = int(colour[region][0])
    # Blurred edges below half coverage still carry area: add the free ring around the region.
    ring = _dilate(region, _RING) & ~taken
    if c == OTHER:
      soft = region.astype(np.float32)
    else:
      ring_alpha = np.clip(offset @ _PALETTE[c] / (_PALETTE[c] ** 2).sum(), 0, 1)
      soft = np.where(region, alpha, 0) + np.where(ring, ring_alpha, 0)
    shape, x, y, half, fit = _fit(soft.astype(np.float32))
    blobs.append(Blob(None if c == OTHER else shapes.COLOURS[c], shape,
                      "small" if 2 * half < SIZE_THRESHOLD else "large",
                      float(x), float(y), float(2 * half), float(soft.sum()), fit))
  return sorted(blobs, key=lambda b: -b.mass)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
  h, w = mask.shape
  for _ in range(steps):
    padded = np.pad(mask, 1)
    mask = np.any([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
  return mask


# ---------------------------------------------------------------------------------------------
# Shapes: judging a caption's attributes.
# ---------------------------------------------------------------------------------------------

OBJECT_ATTRIBUTES = ("colour", "shape", "size")
# Per image: one-object scenes have a position, two-object scenes a relation.
ATTRIBUTES = ("count", *OBJECT_ATTRIBUTES, "position", "relation")


def _cell(blob: Blob) -> str:
  col, row = (min(max(int(v * 3), 0), 2) for v in (blob.x, blob.y))
  return shapes.POSITIONS[3 * row + col]


def relation_of(first: Blob, second: Blob) -> str:
  """How `first` stands to `second` along the axis their centres differ most on."""
  dx, dy = second.x - first.x, second.y - first.y
  if abs(dx) >= abs(dy):
    return "left of" if dx > 0 else "right of"
  return "above" if dy > 0 else "below"


def _judge_match(scene: shapes.Scene, blobs: Sequence[Blob | None]) -> dict[str, bool]:
  pairs = list(zip(scene.objects, blobs))
  verdict = {a: all(b is not None and getattr(b, a) == getattr(o, a) for o, b in pairs)
             for a in OBJECT_ATTRIBUTES}
  if scene.position is not None:
    verdict["position"] = blobs[0] is not None and _cell(blobs[0]) == scene.position
  else:
    verdict["relation"] = None not in blobs and relation_of(*blobs) == scene.relation
  return verdict


def _score(scene: shapes.Scene, blobs: Sequence[Blob | None]) -> tuple[int, float]:
  # Attributes right per object (not per image), then the matched area, to rank matchings.
  right = sum(getattr(b, a) == getattr(o, a) for o, b in zip(scene.objects, blobs)
              if b is not None for a in OBJECT_ATTRIBUTES)
  verdict = _judge_match(scene, blobs)
  right += verdict.get("position", False) + verdict.get("relation", False)
  return right, sum(b.mass for b in blobs if b is not None)


def judge_shapes(image: np.ndarray, caption: str | shapes.Scene) -> dict[str, bool]:
  """Whether the image has each captioned attribute.

  Returns `count` (exactly as many objects as captioned), `colour`, `shape`, `size` (every
  captioned object), `position` (one object: its grid cell) or `relation` (two objects), and
  `all`. The captioned objects are matched to the detected ones the way that gets most
  attributes right (two equal objects may be either one), so in a wrong image a single attribute
  can come out right by the choice of matching: judge models by `all`.
  """
  scene = shapes.parse_caption(caption) if isinstance(caption, str) else caption
  detected = detect_objects(image)
  candidates = list(range(min(len(detected), _MAX_BLOBS))) + [None] * len(scene.objects)
  # Ordered and deduplicated, so ties go the same way in every process.
  matchings = dict.fromkeys(itertools.permutations(candidates, len(scene.objects)))
  best = max(matchings, key=lambda m: _score(
      scene, [None if i is None else detected[i] for i in m]))
  verdict = _judge_match(scene, [None if i is None else detected[i] for i in best])
  verdict = {"count": len(detected) == len(scene.objects), **verdict}
  verdict["all"] = all(verdict.values())
  return verdict


def summarize(verdicts: Sequence[Mapping[str, bool]]) -> dict:
  """Rates over images: `accuracy` (all attributes right), per attribute, and the counts."""
  names = [a for a in ATTRIBUTES if any(a in v for v in verdicts)]
  return {
      "accuracy": float(np.mean([v["all"] for v in verdicts])) if verdicts else 0.0,
      "count": len(verdicts),
      "attributes": {a: float(np.mean([v[a] for v in verdicts if a in v])) for a in names},
      "attribute_counts": {a: sum(a in v for v in verdicts) for a in names},
  }


def shapes_kept(scenes: Sequence[shapes.Scene], images: np.ndarray) -> dict[str, dict]:
  """Per "size shape" of the captioned objects ("small star"): the share drawn with their shape.

  An object counts as kept when some detected object of its colour has its shape; this tells
  which shapes a dVAE's reconstructions lose, where `judge_shapes` says only that one did.
  """
  kept: dict[str, list[bool]] = {}
  for scene, image in zip(scenes, images):
    blobs = detect_objects(image)
    for o in scene.objects:
      right = any(b.colour == o.colour and b.shape == o.shape for b in blobs)
      kept.setdefault(f"{o.size} {o.shape}", []).append(right)
  return {name: {"kept": float(np.mean(rights)), "count": len(rights)}
          for name, rights in sorted(kept.items())}


CHANCE_METHOD = ("judged: jittered renders of random training-split scenes (what a model that "
                 "ignores its caption draws) judged against each caption")


def shapes_chance(scenes: Iterable[shapes.Scene], resolution: int, draws: int = 4,
                  seed: int = 0) -> dict:
  """`summarize` of `draws` random training images per scene, judged against that scene."""
  rng = np.random.default_rng(seed)
  verdicts = []
  for scene in scenes:
    for _ in range(draws):
      drawn = shapes.sample_scene(rng, "train")
      verdicts.append(judge_shapes(shapes.render_scene(drawn, resolution, rng), scene))
  return summarize(verdicts)


# ---------------------------------------------------------------------------------------------
# Emoji: the nearest of a family's variants.
# ---------------------------------------------------------------------------------------------

_EMOJI_SIDE = 32  # images are compared at 32x32 ...
_EMOJI_BLUR = 1.0  # ... after a Gaussian blur of this radius (pixels), as dVAE outputs are blurry


def emoji_features(image: np.ndarray) -> np.ndarray:
  """uint8[H, W, 3] -> float32[32, 32, 3]: shrunk and blurred, so small shifts count little."""
  picture = Image.fromarray(np.asarray(image, np.uint8)[..., :3])
  picture = picture.resize((_EMOJI_SIDE, _EMOJI_SIDE), Image.Resampling.BOX)
  return np.asarray(picture.filter(ImageFilter.GaussianBlur(_EMOJI_BLUR)), np.float32)


def variant_distances(image: np.ndarray, variants: np.ndarray) -> np.ndarray:
  """Mean squared `emoji_features` difference: image uint8[H, W, 3], variants uint8[V, H, W, 3]
  -> float32[V]."""
  sample = emoji_features(image)
  return np.array([((emoji_features(v) - sample) ** 2).mean() for v in variants], np.float32)


def nearest_variant(image: np.ndarray, variants: np.ndarray) -> int:
  """The index of the variant uint8[V, H, W, 3] nearest to the image uint8[H, W, 3]."""
  return int(variant_distances(image, variants).argmin())


def _without_tones(entry: emoji.EmojiEntry) -> tuple[str, ...]:
  return tuple(p for p in entry.variant.split(", ") if p and p not in emoji.SKIN_TONES)


def tone_siblings(entry: emoji.EmojiEntry, family: Sequence[emoji.EmojiEntry]
                  ) -> list[emoji.EmojiEntry]:
  """The members of a toned entry's family that differ from it only in skin tones (itself
  included), e.g. the five tones of "woman technologist"; empty for an untoned entry."""
  tones = lambda e: [p for p in e.variant.split(", ") if p in emoji.SKIN_TONES]
  if not tones(entry):
    return []
  return [e for e in family
          if _without_tones(e) == _without_tones(entry) and len(tones(e)) == len(tones(entry))]
