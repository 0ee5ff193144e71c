"""Trains the caption tokenizer (SentencePiece BPE) and saves it where the checkpoints will go.

  python experiments/train_tokenizer.py --captions_file=captions.txt --out_dir=/tmp/run
  python experiments/train_tokenizer.py --dataset=shapes --num_captions=20000 --vocab_size=1024 \
      --text_len=64 --out_dir=/tmp/run

Writes `tokenizer.model` and `tokenizer.json` into `--out_dir`; load them with `Tokenizer.load`.
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags

from dalle_jax import tokenizer as tokenizer_lib

_CAPTIONS_FILE = flags.DEFINE_string("captions_file", None, "UTF-8 text file, one caption a line.")
_DATASET = flags.DEFINE_enum("dataset", None, ["shapes"], "Dataset to read captions from.")
_NUM_CAPTIONS = flags.DEFINE_integer("num_captions", 10_000, "Captions to read from --dataset.")
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

# Captions do not depend on the image size; a small one keeps drawing the shapes cheap.
_SHAPES_RESOLUTION = 64


def read_captions(captions_file: str | None, dataset: str | None, num_captions: int,
                  seed: int) -> list[str]:
  """The training captions: every line of `captions_file`, or the first ones of `dataset`."""
  if captions_file is not None:
    with open(captions_file, encoding="utf-8") as f:
      return [line.rstrip("\n") for line in f]
  if dataset == "shapes":
    try:
      from dalle_jax.data.shapes import ShapesSource  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise app.UsageError(
          f"--dataset=shapes needs dalle_jax.data.shapes.ShapesSource, which failed to import "
          f"({e}). Pass --captions_file instead.") from e
    source = ShapesSource(num_examples=num_captions, resolution=_SHAPES_RESOLUTION, seed=seed,
                          split="train")
    captions = []
    for record in source:
      captions.extend(c.decode("utf-8") if isinstance(c, bytes) else c for c in record.captions)
      if len(captions) >= num_captions:
        break
    return captions[:num_captions]
  raise app.UsageError(f"Unknown --dataset={dataset}.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  captions = read_captions(_CAPTIONS_FILE.value, _DATASET.value, _NUM_CAPTIONS.value, _SEED.value)
  tokenizer = tokenizer_lib.train_tokenizer(
      captions, _VOCAB_SIZE.value, _TEXT_LEN.value, _OUT_DIR.value, dropout=_DROPOUT.value,
      character_coverage=_CHARACTER_COVERAGE.value)
  # In chunks: one [num_captions, text_len] array of a web-scale dataset would not fit in memory.
  num_truncated = sum(tokenizer.encode_batch(captions[i:i + 4096])[1]
                      for i in range(0, len(captions), 4096))
  print(f"vocab_size: {tokenizer.vocab_size}")
  print(f"captions: {len(captions)}")
  print(f"truncated at text_len={tokenizer.text_len}: {num_truncated / max(len(captions), 1):.4%} "
        f"({num_truncated})")
  print(f"wrote {tokenizer_lib.MODEL_FILE} and {tokenizer_lib.CONFIG_FILE} to {_OUT_DIR.value}")


if __name__ == "__main__":
  app.run(main)
