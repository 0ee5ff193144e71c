"""Trains the caption tokenizer (SentencePiece BPE) and saves it where the checkpoints will go.

  python experiments/train_tokenizer.py --captions_file=captions.txt --out_dir=/tmp/run
  python experiments/train_tokenizer.py --dataset=shapes --num_captions=20000 --vocab_size=1024 \
      --text_len=64 --out_dir=/tmp/run
  python experiments/train_tokenizer.py --dataset=folder --path=photos/ --out_dir=/tmp/run
  python experiments/train_tokenizer.py --dataset=webdataset --path='data/{00000..00009}.tar' ...
  python experiments/train_tokenizer.py --dataset=emoji --vocab_size=768 --text_len=24 ...

--dataset reads every caption line of the dataset's --split (the datasets the trainers read), up
to --num_captions, skipping records without a caption or that the dataset marks unusable. Writes
`tokenizer.model` and `tokenizer.json` into `--out_dir`; load them with `Tokenizer.load`.
"""

from __future__ import annotations

import collections
from typing import Sequence

from absl import app
from absl import flags

from dalle_jax import data as data_lib
from dalle_jax import tokenizer as tokenizer_lib
from dalle_jax.data import records

_CAPTIONS_FILE = flags.DEFINE_string("captions_file", None, "UTF-8 text file, one caption a line.")
_DATASET = flags.DEFINE_enum("dataset", None, list(data_lib.DATASETS),
                             "Dataset to read captions from.")
_PATH = flags.DEFINE_string("path", None, "The folder, or the webdataset's .tar shards (a brace "
                            "pattern or a comma-separated list).")
_SPLIT = flags.DEFINE_string("split", "train", "Split of shapes or emoji: held-out captions stay "
                             "unseen.")
_NUM_CAPTIONS = flags.DEFINE_integer("num_captions", 10_000, "Captions to read from --dataset, "
                                     "at most.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of a generated --dataset.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 16384, "BPE pieces, <unk> and 256 bytes included.")
_TEXT_LEN = flags.DEFINE_integer("text_len", 256, "Text positions per example.")
_DROPOUT = flags.DEFINE_float("dropout", tokenizer_lib.DEFAULT_DROPOUT,
                              "BPE-dropout probability saved with the tokenizer.")
_CHARACTER_COVERAGE = flags.DEFINE_float(
    "character_coverage", 1.0, "Fraction of characters given a piece; the rest fall back to bytes.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Directory to write the tokenizer to.",
                               required=True)
flags.mark_flags_as_mutual_exclusive(["captions_file", "dataset"], required=True)

# Captions do not depend on the image size; a small one keeps drawing shapes and emoji cheap.
_RESOLUTION = 16


def dataset_records(dataset: str, path: str | None, split: str, num_captions: int, seed: int):
  """The dataset's `RawRecord`s in order: random-access sources by index, streams once."""
  source = data_lib.make_source(dataset, resolution=_RESOLUTION, path=path, split=split,
                                num_examples=num_captions, seed=seed)
  if hasattr(source, "configure"):  # a stream (webdataset): one pass, shards in order
    return iter(source.configure(seed=seed, shuffle_shards=False, num_epochs=1))
  return (source[i] for i in range(len(source)))


def read_captions(captions_file: str | None, dataset: str | None, path: str | None, split: str,
                  num_captions: int, seed: int) -> tuple[list[str], collections.Counter]:
  """The training captions (every line of `captions_file`, or the first `num_captions` caption
  lines of `dataset`) and the counts of records skipped, by reason."""
  skipped = collections.Counter()
  if captions_file is not None:
    with open(captions_file, encoding="utf-8") as f:
      return [line.rstrip("\n") for line in f], skipped
  captions = []
  for record in dataset_records(dataset, path, split, num_captions, seed):
    if len(captions) >= num_captions:
      break
    if record.skip:
      skipped[record.skip] += 1
      continue
    try:
      lines = [c.decode("utf-8") if isinstance(c, bytes) else c for c in record.captions]
    except UnicodeDecodeError:
      skipped[records.CAPTION_NOT_UTF8] += 1
      continue
    lines = [line.strip() for line in lines if line.strip()]
    if not lines:
      skipped[records.MISSING_CAPTION if not record.captions else records.EMPTY_CAPTION] += 1
      continue
    captions.extend(lines)
  if not captions:
    raise app.UsageError(f"--dataset={dataset} gave no caption ({dict(skipped) or 'no records'})"
                         ": check --path and --split")
  return captions[:num_captions], skipped


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  captions, skipped = read_captions(_CAPTIONS_FILE.value, _DATASET.value, _PATH.value,
                                    _SPLIT.value, _NUM_CAPTIONS.value, _SEED.value)
  tokenizer = tokenizer_lib.train_tokenizer(
      captions, _VOCAB_SIZE.value, _TEXT_LEN.value, _OUT_DIR.value, dropout=_DROPOUT.value,
      character_coverage=_CHARACTER_COVERAGE.value)
  # In chunks: one [num_captions, text_len] array of a web-scale dataset would not fit in memory.
  num_truncated = sum(tokenizer.encode_batch(captions[i:i + 4096])[1]
                      for i in range(0, len(captions), 4096))
  print(f"vocab_size: {tokenizer.vocab_size}")
  print(f"captions: {len(captions)}")
  if skipped:
    print("skipped records: " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
  print(f"truncated at text_len={tokenizer.text_len}: {num_truncated / max(len(captions), 1):.4%} "
        f"({num_truncated})")
  print(f"wrote {tokenizer_lib.MODEL_FILE} and {tokenizer_lib.CONFIG_FILE} to {_OUT_DIR.value}")


if __name__ == "__main__":
  app.run(main)
