"""dalle_jax/data/folder.py through the loader: a real tree with corrupt images and bad captions."""

import os

import numpy as np
import pytest

from conftest import encode_image, random_pixels, write_folder
from dalle_jax.data import folder, pipeline, records


def _one_pass(source, **overrides):
  config = pipeline.LoaderConfig(resolution=16, batch_size=None, num_epochs=1, shuffle=False,
                                 **overrides)
  loader = pipeline.Loader(source, config, process_index=0, process_count=1)
  return list(loader), loader.counts


def test_every_file_is_accounted_for_by_reason(tmp_path, bad_and_good_files):
  files, expected = bad_and_good_files
  source = folder.FolderSource(write_folder(str(tmp_path), files))
  examples, counts = _one_pass(source)
  assert len(source) == len(files)
  assert {k: v for k, v in counts.items() if v} == expected
  assert sorted(os.path.basename(e["key"]) for e in examples) == [
      "good_grey_jpeg.png", "good_jpeg_rgba.png", "good_palette_gif.png", "good_png.png"]
  assert all(e["image"].shape == (16, 16, 3) and e["image"].dtype == np.uint8 for e in examples)
  assert "un caf\u00e9" in {e["caption"] for e in examples}


def test_one_caption_line_is_drawn_per_epoch(tmp_path):
  pixels = encode_image(random_pixels(0))
  write_folder(str(tmp_path), {"cat": (pixels, b"a cat\n\na small cat\na sleeping cat\n")})
  source = folder.FolderSource(str(tmp_path))
  config = pipeline.LoaderConfig(resolution=8, batch_size=None, num_epochs=30, seed=1)
  captions = [e["caption"] for e in pipeline.Loader(source, config, process_index=0,
                                                    process_count=1)]
  assert set(captions) == {"a cat", "a small cat", "a sleeping cat"}  # blank line never drawn
  again = [e["caption"] for e in pipeline.Loader(source, config, process_index=0, process_count=1)]
  assert captions == again


def test_a_tree_without_caption_files_is_a_clear_error(tmp_path):
  with open(tmp_path / "lonely.png", "wb") as f:
    f.write(encode_image(random_pixels(0)))
  with pytest.raises(records.NoUsableDataError, match=r"lonely.*|same-stem|\.txt"):
    folder.FolderSource(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    folder.FolderSource(str(tmp_path / "missing"))


def test_a_tree_whose_images_are_all_corrupt_is_a_clear_error(tmp_path):
  write_folder(str(tmp_path), {f"bad{i}": (b"\x89PNG broken", b"caption") for i in range(3)})
  with pytest.raises(records.NoUsableDataError, match="corrupt_image=3"):
    _one_pass(folder.FolderSource(str(tmp_path)))


def test_unreadable_file_is_skipped_and_counted(tmp_path, bad_and_good_files):
  files, expected = bad_and_good_files
  write_folder(str(tmp_path), files)
  source = folder.FolderSource(str(tmp_path))
  # Removed after indexing, as when a network filesystem loses a file mid-run.
  os.remove(next(str(p) for p in tmp_path.rglob("good_png.png")))
  _, counts = _one_pass(source)
  assert counts["unreadable_file"] == 1 and counts["usable"] == expected["usable"] - 1
