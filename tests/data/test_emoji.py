"""Tests for `dalle_jax/data/emoji.py`: parsing, families, the held-out split, rendering."""

import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

from dalle_jax.data import emoji, records

@pytest.fixture(scope="module")
def entries():
  return emoji.load_emoji_entries()


@pytest.fixture(scope="module")
def by_name(entries):
  return {e.name: e for e in entries}


@pytest.fixture(scope="module")
def rendered_all():
  """Every entry drawn once at 16x16, with the seconds it took."""
  source = emoji.EmojiSource(16, split="all")
  start = time.perf_counter()
  items = [source[i] for i in range(len(source))]
  return items, time.perf_counter() - start


def _count_fully_qualified(path):
  # Independent of the module's parser: the status field between ";" and "#".
  with open(path, encoding="utf-8") as f:
    return sum(1 for line in f if not line.startswith("#") and ";" in line
               and line.split("#")[0].split(";")[1].strip() == "fully-qualified")


def test_loads_every_fully_qualified_entry(entries):
  assert len(entries) == _count_fully_qualified(emoji.DEFAULT_TEST_PATH)
  assert 3500 <= len(entries) <= 4000
  assert len({e.name for e in entries}) == len(entries)
  assert len({e.codepoints for e in entries}) == len(entries)
  assert entries[0].name == "grinning face" and entries[0].sequence == "\U0001F600"


def test_known_parses(by_name):
  hand = by_name["waving hand: medium skin tone"]
  assert (hand.family, hand.variant, hand.group, hand.subgroup) == (
      "waving hand", "medium skin tone", "People & Body", "hand-fingers-open")
  assert hand.sequence == "\U0001F44B\U0001F3FD" and hand.codepoints == "1F44B-1F3FD"
  for name in ("woman technologist: dark skin tone", "man technologist", "technologist"):
    assert by_name[name].family == "technologist"
  assert by_name["woman technologist: dark skin tone"].variant == "woman, dark skin tone"
  assert by_name["technologist"].variant == ""
  kiss = by_name["kiss: woman, man, medium skin tone, dark skin tone"]
  assert (kiss.family, kiss.variant) == ("kiss", "woman, man, medium skin tone, dark skin tone")
  assert by_name["kiss: person, person, light skin tone, dark skin tone"].variant == (
      "light skin tone, dark skin tone")
  assert by_name["woman and man holding hands"].family == "people holding hands"
  assert by_name["man: red hair"].family == "person: red hair"
  assert by_name["boy"].family == by_name["girl"].family == "child"
  assert by_name["Santa Claus"].family == "mx claus"
  # Gender words only count with a sibling; possessives are no gender at all.
  assert by_name["person fencing"].family == "person fencing"
  assert by_name["woman with headscarf"].family == "woman with headscarf"
  assert by_name["man’s shoe"].family == "man’s shoe"
  assert by_name["crown"].family == "crown"
  assert by_name["flag: Isle of Man"].family == "flag: Isle of Man"


def test_heldout_split(entries):
  train = [e for e in entries if not e.heldout]
  heldout = [e for e in entries if e.heldout]
  assert not {e.name for e in train} & {e.name for e in heldout}
  assert len(train) + len(heldout) == len(entries)
  assert 200 <= len(heldout) <= 800
  train_families = {e.family for e in train}
  assert all(e.family in train_families for e in heldout)
  # Both kinds: a held-out tone, and a gender held out with all its tones (even untoned).
  assert any("skin tone" in e.variant for e in heldout)
  assert any(e.variant and "skin tone" not in e.variant for e in heldout)
  # The default member of a family is never held out.
  assert not any(e.heldout and e.variant == "" for e in entries)
  counts = emoji.split_counts(entries)
  assert (counts["total"], counts["train"], counts["heldout"]) == (
      len(entries), len(train), len(heldout))


def test_one_tone_held_out_per_toned_family(entries):
  for family, members in emoji.group_by_family(entries).items():
    by_tone = {}
    for e in members:
      tones = [p for p in e.variant.split(", ") if p in emoji.SKIN_TONES]
      if tones:
        by_tone.setdefault(tones[0], []).append(e.heldout)
    if by_tone:
      assert sorted(by_tone) == sorted(emoji.SKIN_TONES), family
      assert sum(all(held) for held in by_tone.values()) == 1, family


def test_split_is_the_same_in_another_process(entries):
  # PYTHONHASHSEED changes hash(); the split must not change with it.
  code = ("from dalle_jax.data import emoji; "
          "print(sum(1 << i for i, e in enumerate(emoji.load_emoji_entries()) if e.heldout))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
  assert int(out) == sum(1 << i for i, e in enumerate(entries) if e.heldout)


def test_source_splits_and_records(entries):
  train, heldout = emoji.EmojiSource(8, "train"), emoji.EmojiSource(8, "heldout")
  assert len(train) + len(heldout) == len(entries)
  record = heldout[0]
  assert isinstance(record, records.RawRecord)
  entry = heldout.entries[0]
  assert record.key == f"emoji/{entry.codepoints}" and record.captions == (entry.name,)
  assert record.image.shape == (8, 8, 3) and record.image.dtype == np.uint8
  assert record.meta == {"group": entry.group, "subgroup": entry.subgroup,
                         "family": entry.family, "variant": entry.variant, "split": "heldout"}
  assert entry in heldout.variants_of(entry.family)
  assert any(not e.heldout for e in heldout.variants_of(entry.family))
  with pytest.raises(IndexError):
    train[len(train)]
  with pytest.raises(ValueError):
    emoji.EmojiSource(8, "test")
  clone = pickle.loads(pickle.dumps(train))
  np.testing.assert_array_equal(clone[5].image, train[5].image)


def test_every_entry_renders(rendered_all):
  items, seconds = rendered_all
  print(f"rendered {len(items)} emoji at 16x16 in {seconds:.1f} s")
  for record in items:
    assert record.image.shape == (16, 16, 3) and record.image.dtype == np.uint8, record.key
    assert record.image.min() < 255, record.key
  assert len({r.key for r in items}) == len(items)


def test_sequences_render_as_one_glyph(by_name):
  single = emoji.render_glyph(by_name["grinning face"].sequence).width
  for name in ("family: man, woman, girl, boy", "woman technologist: medium skin tone",
               "kiss: woman, man, medium skin tone, dark skin tone", "flag: Germany",
               "handshake: light skin tone, dark skin tone"):
    assert emoji.render_glyph(by_name[name].sequence).width <= 1.2 * single, name
  plain = emoji.render_emoji(by_name["waving hand"].sequence, 32).astype(int)
  toned = emoji.render_emoji(by_name["waving hand: dark skin tone"].sequence, 32).astype(int)
  assert np.abs(plain - toned).mean() > 10


def test_render_is_centred_on_white(by_name):
  # Taller than wide glyphs get white bars left and right.
  standing = emoji.render_emoji(by_name["person standing"].sequence, 32)
  assert (standing[:, 0] == 255).all() and (standing[:, -1] == 255).all()
  assert standing[:, 16].min() < 128


def test_missing_files_name_the_packages(tmp_path):
  with pytest.raises(FileNotFoundError, match="unicode-data"):
    emoji.load_emoji_entries(str(tmp_path / "emoji-test.txt"))
  with pytest.raises((FileNotFoundError, RuntimeError), match="fonts-noto-color-emoji"):
    emoji.render_emoji("\U0001F600", 16, font_path=str(tmp_path / "NotoColorEmoji.ttf"))
