"""The `emoji` dataset: every fully-qualified Unicode emoji, drawn with Noto Color Emoji.

Captions are the CLDR short names from `emoji-test.txt` ("waving hand: medium skin tone"); images
are drawn here with Pillow, so a record carries pixels, not file bytes. Both inputs come from
Debian packages: `apt-get install fonts-noto-color-emoji unicode-data`.

Entries are grouped into *families*: a name with its skin tones and gender removed ("woman
technologist: dark skin tone" -> "technologist"), and the removed part is the *variant*. A
deterministic split holds out some variants, never a family's default member, so a model is
evaluated on captions it never saw that combine a family it knows with a tone or gender it knows.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import operator
import os
import re
import zlib
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from dalle_jax.data import records

DEFAULT_TEST_PATH = "/usr/share/unicode/emoji/emoji-test.txt"
DEFAULT_FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
# Noto Color Emoji holds 136x128 bitmaps (CBDT) and FreeType loads it at this size only.
NATIVE_SIZE = 109
INSTALL_HINT = "apt-get install fonts-noto-color-emoji unicode-data"
SPLITS = ("train", "heldout", "all")

# In CLDR order, lightest first; the held-out tone of a family is an index into this tuple.
SKIN_TONES = (
    "light skin tone", "medium-light skin tone", "medium skin tone", "medium-dark skin tone",
    "dark skin tone")

# Word -> (gender it marks, "" when neutral; the noun left when the name is only that word).
_GENDER_WORDS = {
    "man": ("man", "person"), "woman": ("woman", "person"), "person": ("", "person"),
    "men": ("men", "people"), "women": ("women", "people"), "people": ("", "people"),
    "boy": ("boy", "child"), "girl": ("girl", "child"), "child": ("", "child"),
}
_WORDS = "|".join(_GENDER_WORDS)
# "woman and man holding hands" is one gender; "man’s shoe" and "men’s room" are no gender at all.
_GENDER_RE = re.compile(rf"\b({_WORDS})(?: and ({_WORDS}))?\b(?![’'])")
# Gender variants whose names share no word to strip: base name -> (stem, gender).
_IRREGULAR = {
    "older person": ("older person", ""), "old man": ("older person", "man"),
    "old woman": ("older person", "woman"),
    "mx claus": ("mx claus", ""), "Santa Claus": ("mx claus", "man"),
    "Mrs. Claus": ("mx claus", "woman"),
    "person with crown": ("person with crown", ""), "prince": ("person with crown", "man"),
    "princess": ("person with crown", "woman"),
    "merperson": ("merperson", ""), "merman": ("merperson", "man"),
    "mermaid": ("merperson", "woman"),
}
# codepoints ; status # emoji E<version> name
_LINE_RE = re.compile(r"^([0-9A-Fa-f ]+?)\s*;\s*([a-z-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(.+?)\s*$")


class EmojiDataMissingError(FileNotFoundError):
  """The emoji list or the font is not installed; the message says which packages to install."""


@dataclasses.dataclass(frozen=True)
class EmojiEntry:
  """One fully-qualified emoji.

  Attributes:
    sequence: the emoji itself, as a string of code points (ZWJ and FE0F included).
    name: the CLDR short name, the caption ("waving hand: medium skin tone").
    group, subgroup: where emoji-test.txt files it ("People & Body", "hand-fingers-open").
    family: the name without skin tones and gender ("waving hand").
    variant: what sets it apart in its family ("woman, dark skin tone"); "" for the default.
    heldout: whether the deterministic split keeps it out of training.
    codepoints: upper-case hex code points joined by "-" ("1F44B-1F3FD"); unique, used in keys.
  """
  sequence: str
  name: str
  group: str
  subgroup: str
  family: str
  variant: str
  heldout: bool
  codepoints: str


@dataclasses.dataclass(frozen=True)
class _NameParts:
  """A name cut into the pieces that decide its family and variant."""
  base: str  # the name before ": "
  stem: str  # `base` without its gender word, or `base` when no sibling shares the stem
  gender: str  # "man", "woman, man", ...; "" when neutral
  tones: tuple[str, ...]
  rest: tuple[str, ...]  # qualifiers that are neither tone nor gender ("beard", "Germany")


def _missing(what: str, path: str) -> EmojiDataMissingError:
  return EmojiDataMissingError(f"{what} not found at {path!r}; install it with `{INSTALL_HINT}`.")


def _parse_test_file(path: str) -> list[tuple[str, str, str, str]]:
  """Fully-qualified lines of emoji-test.txt as (codepoints, name, group, subgroup), in order."""
  if not os.path.isfile(path):
    raise _missing("emoji-test.txt (Debian package unicode-data)", path)
  rows, group, subgroup = [], "", ""
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.startswith("# group:"):
        group = line.partition(":")[2].strip()
      elif line.startswith("# subgroup:"):
        subgroup = line.partition(":")[2].strip()
      elif line.strip() and not line.startswith("#"):
        match = _LINE_RE.match(line)
        if match is None:
          raise ValueError(f"{path}: cannot parse line {line!r}")
        codepoints, status, name = match.groups()
        if status == "fully-qualified":
          rows.append(("-".join(codepoints.upper().split()), name, group, subgroup))
  if not rows:
    raise ValueError(f"{path}: no fully-qualified emoji found; is it emoji-test.txt?")
  return rows


def _strip_gender(base: str) -> tuple[str, str]:
  """(stem, gender) of a base name: "woman technologist" -> ("technologist", "woman")."""
  if base in _IRREGULAR:
    return _IRREGULAR[base]
  match = _GENDER_RE.search(base)
  if match is None:
    return base, ""
  words = [w for w in match.groups() if w]
  gender = " and ".join(words) if any(_GENDER_WORDS[w][0] for w in words) else ""
  stem = " ".join((base[:match.start()] + base[match.end():]).split())
  return stem or _GENDER_WORDS[words[0]][1], gender


def _split_names(names: Sequence[str]) -> list[_NameParts]:
  """Cuts every name into parts; a gender word only counts when a sibling shares the stem."""
  cut = []
  for name in names:
    base, _, qualifiers = name.partition(": ")
    parts = qualifiers.split(", ") if qualifiers else []
    tones = tuple(p for p in parts if p in SKIN_TONES)
    genders = [p for p in parts if p in _GENDER_WORDS]
    rest = tuple(p for p in parts if p not in SKIN_TONES and p not in _GENDER_WORDS)
    # "kiss: person, person, ..." is the neutral kiss; "kiss: woman, man, ..." is a gender.
    gender = ", ".join(genders) if any(_GENDER_WORDS[g][0] for g in genders) else ""
    cut.append((base, tones, rest, gender, _strip_gender(base)))
  bases_of_stem = collections.defaultdict(set)
  for base, _, _, _, (stem, _) in cut:
    bases_of_stem[stem].add(base)
  parts = []
  for base, tones, rest, gender, (stem, base_gender) in cut:
    # "person fencing" has no man or woman sibling: its "person" is part of the name.
    if len(bases_of_stem[stem]) < 2:
      stem, base_gender = base, ""
    parts.append(_NameParts(base, stem, base_gender or gender, tones, rest))
  return parts


def _family_names(parts: Sequence[_NameParts]) -> list[str]:
  """The family of each entry, named after its neutral member ("person frowning") if any."""
  neutral_base = {}
  for p in parts:
    if not p.gender:
      neutral_base.setdefault(p.stem, p.base)
  families = []
  for p in parts:
    head = neutral_base.get(p.stem, p.stem)
    families.append(f"{head}: {', '.join(p.rest)}" if p.rest else head)
  return families


def _stable_hash(*parts: str) -> int:
  # zlib.crc32, unlike hash(), is the same in every process and on every machine.
  return zlib.crc32("\0".join(parts).encode("utf-8"))


def _heldout_indices(families: Sequence[str], parts: Sequence[_NameParts]) -> set[int]:
  """Indices held out: per family one skin tone, and in a third of families one gender."""
  members = collections.defaultdict(list)
  for i, family in enumerate(families):
    members[family].append(i)
  heldout = set()
  for family, indices in members.items():
    # The default member: the first with neither tone nor gender, else the first untoned one.
    default = min(indices, key=lambda i: (bool(parts[i].gender) + bool(parts[i].tones) * 2, i))
    if any(parts[i].tones for i in indices):
      tone = SKIN_TONES[_stable_hash("tone", family) % len(SKIN_TONES)]
      heldout.update(i for i in indices if parts[i].tones[:1] == (tone,))
    default_gender = parts[default].gender
    genders = list(dict.fromkeys(
        parts[i].gender for i in indices if parts[i].gender != default_gender))
    if genders and _stable_hash("gender", family) % 3 == 0:
      gender = genders[_stable_hash("variant", family) % len(genders)]
      heldout.update(i for i in indices if parts[i].gender == gender)
    heldout.discard(default)
  return heldout


def load_emoji_entries(test_path: str = DEFAULT_TEST_PATH) -> list[EmojiEntry]:
  """Every fully-qualified emoji in emoji-test.txt, in file order, with family and split."""
  rows = _parse_test_file(test_path)
  parts = _split_names([name for _, name, _, _ in rows])
  families = _family_names(parts)
  heldout = _heldout_indices(families, parts)
  entries = []
  for i, ((codepoints, name, group, subgroup), p) in enumerate(zip(rows, parts)):
    sequence = "".join(chr(int(c, 16)) for c in codepoints.split("-"))
    variant = ", ".join(([p.gender] if p.gender else []) + list(p.tones))
    entries.append(EmojiEntry(
        sequence=sequence, name=name, group=group, subgroup=subgroup, family=families[i],
        variant=variant, heldout=i in heldout, codepoints=codepoints))
  return entries


def group_by_family(entries: Iterable[EmojiEntry]) -> dict[str, tuple[EmojiEntry, ...]]:
  """family -> its entries (train and held-out), in file order."""
  by_family = collections.defaultdict(list)
  for entry in entries:
    by_family[entry.family].append(entry)
  return {family: tuple(members) for family, members in by_family.items()}


def split_counts(entries: Sequence[EmojiEntry]) -> dict[str, int]:
  """How many entries and families the split has: total, train, heldout, families, ..."""
  held = [e for e in entries if e.heldout]
  return {
      "total": len(entries),
      "train": len(entries) - len(held),
      "heldout": len(held),
      "heldout_toned": sum("skin tone" in e.variant for e in held),
      "heldout_untoned": sum("skin tone" not in e.variant for e in held),
      "families": len({e.family for e in entries}),
      "families_with_heldout": len({e.family for e in held}),
  }


@functools.lru_cache(maxsize=None)
def _load_font(font_path: str) -> ImageFont.FreeTypeFont:
  """The emoji font at its only size; loaded once per process and path."""
  if not os.path.isfile(font_path):
    raise _missing("Noto Color Emoji font (Debian package fonts-noto-color-emoji)", font_path)
  if not features.check("raqm"):
    raise RuntimeError(
        "Pillow has no RAQM text layout (needs libraqm, libfribidi and libharfbuzz); without it "
        "skin-tone and ZWJ sequences draw as several glyphs instead of one.")
  return ImageFont.truetype(font_path, NATIVE_SIZE, layout_engine=ImageFont.Layout.RAQM)


def render_glyph(sequence: str, font_path: str = DEFAULT_FONT_PATH) -> Image.Image:
  """The emoji at native size as an RGBA image cropped to its ink (about 136x128)."""
  font = _load_font(font_path)
  left, top, right, bottom = font.getbbox(sequence)
  # The drawn bitmap can stick out of the layout box by a few pixels; leave room for it.
  margin = NATIVE_SIZE // 4
  canvas = Image.new("RGBA", (right - left + 2 * margin, bottom - top + 2 * margin), (0, 0, 0, 0))
  ImageDraw.Draw(canvas).text(
      (margin - left, margin - top), sequence, font=font, embedded_color=True)
  ink = canvas.getchannel("A").getbbox()
  if ink is None:
    raise ValueError(f"the font draws nothing for {sequence!r}")
  return canvas.crop(ink)


def render_emoji(sequence: str, resolution: int, font_path: str = DEFAULT_FONT_PATH) -> np.ndarray:
  """The emoji centred on a white square: `uint8[resolution, resolution, 3]` RGB."""
  glyph = render_glyph(sequence, font_path)
  side = max(glyph.size)
  square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
  square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
  # Composite before resizing so soft edges blend into white, not into transparent black.
  image = square.convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS)
  return np.asarray(image, dtype=np.uint8)


class EmojiSource:
  """Random-access `RawRecord`s of one split; images are drawn on access, in the worker.

  Holds only entries and paths (no font), so it pickles into pipeline worker processes.
  """

  def __init__(self, resolution: int, split: str = "train", test_path: str = DEFAULT_TEST_PATH,
               font_path: str = DEFAULT_FONT_PATH):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    self.resolution = resolution
    self.split = split
    self.font_path = font_path
    self.all_entries = load_emoji_entries(test_path)
    self.entries = [
        e for e in self.all_entries if split == "all" or e.heldout == (split == "heldout")]
    self.families = group_by_family(self.all_entries)

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, index: int) -> records.RawRecord:
    entry = self.entries[operator.index(index)]  # IndexError past the end, as a list does
    return records.RawRecord(
        key=f"emoji/{entry.codepoints}",
        captions=(entry.name,),
        image=render_emoji(entry.sequence, self.resolution, self.font_path),
        meta={"group": entry.group, "subgroup": entry.subgroup, "family": entry.family,
              "variant": entry.variant, "split": "heldout" if entry.heldout else "train"})

  def variants_of(self, family: str) -> tuple[EmojiEntry, ...]:
    """Every entry of `family` in either split, to compare a sample with its closest variant."""
    return self.families[family]

  def counts(self) -> Mapping[str, int]:
    """`split_counts` over all entries."""
    return split_counts(self.all_entries)
