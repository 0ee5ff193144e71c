"""experiments/train_tokenizer.py reads captions from every dataset the trainers read."""

import os
import subprocess
import sys

from conftest import REPO, encode_image, random_pixels, write_folder, write_tar
from dalle_jax import tokenizer as tokenizer_lib
from dalle_jax.data import emoji

SCRIPT = os.path.join(REPO, "experiments",
                      "train_tokenizer.py")


def train(*flags: str) -> str:
  result = subprocess.run([sys.executable, SCRIPT, "--vocab_size=300", "--text_len=12", *flags],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_a_folder_with_bad_records(bad_and_good_files, tmp_path):
  files, _ = bad_and_good_files
  root = write_folder(str(tmp_path / "photos"), files)
  out = train("--dataset=folder", f"--path={root}", f"--out_dir={tmp_path / 'tok'}")
  # Every caption line beside an image: the two of good_jpeg_rgba, one of each other usable
  # record, and the text of the two files whose images are corrupt (not decoded here).
  assert "captions: 7" in out
  assert "skipped records: caption_not_utf8=1, empty_caption=1, missing_caption=1, " \
         "missing_image=1" in out
  tok = tokenizer_lib.Tokenizer.load(str(tmp_path / "tok"))
  assert tok.decode(tok.encode("un café")[0]) == "un café"


def test_webdataset_shards_and_a_cap(tmp_path):
  image = encode_image(random_pixels(0))
  for shard in range(2):
    members = {}
    for i in range(3):
      members[f"{shard}{i:03d}.png"] = image
      members[f"{shard}{i:03d}.txt"] = f"caption {shard} {i}".encode()
    write_tar(str(tmp_path / f"{shard:05d}.tar"), members)
  pattern = str(tmp_path / "{00000..00001}.tar")
  assert "captions: 6" in train("--dataset=webdataset", f"--path={pattern}", "--vocab_size=270",
                                f"--out_dir={tmp_path / 'all'}")
  assert "captions: 4" in train("--dataset=webdataset", f"--path={pattern}", "--num_captions=4",
                                "--vocab_size=270", f"--out_dir={tmp_path / 'four'}")


def test_emoji_reads_the_training_names_only(tmp_path):
  entries = emoji.load_emoji_entries()
  train_names = [e.name for e in entries if not e.heldout]
  out = train("--dataset=emoji", "--num_captions=100000", "--vocab_size=768", "--text_len=24",
              f"--out_dir={tmp_path}")
  assert f"captions: {len(train_names)}" in out and len(train_names) < len(entries)
