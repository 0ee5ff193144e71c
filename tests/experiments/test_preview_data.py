"""experiments/preview_data.py end to end, and `data.make_source` by name."""

import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO, write_folder
from dalle_jax import data



def test_preview_writes_a_grid_and_reports_skips_by_reason(tmp_path, bad_and_good_files):
  files, expected = bad_and_good_files
  write_folder(str(tmp_path / "images"), files)
  out = tmp_path / "grid.png"
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "preview_data.py"), "--dataset=folder",
       f"--path={tmp_path / 'images'}", "--resolution=16", "--num_images=3", f"--out={out}"],
      capture_output=True, text=True, check=True)
  assert "folder: 4 usable pairs, 6 skipped" in result.stdout
  for reason in ("corrupt_image", "empty_caption", "caption_not_utf8", "missing_caption",
                 "missing_image"):
    assert f"skipped {reason}: {expected[reason]}" in result.stdout
  with Image.open(out) as grid:
    assert grid.size[0] == 2 * (128 + 8)  # 3 tiles of 128 pixels in a 2x2 grid, padded


def test_make_source_builds_each_dataset_and_refuses_bad_names(tmp_path):
  assert len(data.make_source("shapes", resolution=16, num_examples=7)) == 7
  assert data.make_source("emoji", resolution=16, split="heldout")[0].meta["split"] == "heldout"
  with pytest.raises(ValueError, match="needs --path"):
    data.make_source("folder", resolution=16)
  with pytest.raises(ValueError, match="choose one of shapes, emoji, folder, webdataset"):
    data.make_source("imagenet", resolution=16)
