"""Preview a dataset: a captioned grid of decoded examples, and how many pairs are usable.

  python experiments/preview_data.py --dataset=shapes --resolution=64 --out=grid.png
  python experiments/preview_data.py --dataset=folder --path=~/my_images --out=grid.png
  python experiments/preview_data.py --dataset=webdataset --path='shards/{00000..00009}.tar'
"""

import os

from absl import app, flags
import tqdm

from dalle_jax import data, image_grid
from dalle_jax.data import pipeline

_DATASET = flags.DEFINE_enum("dataset", "shapes", data.DATASETS, "Which dataset.")
_PATH = flags.DEFINE_string("path", None, "Directory (folder) or tar shards (webdataset).")
_SPLIT = flags.DEFINE_string("split", "train", "shapes and emoji: train or heldout.")
_RESOLUTION = flags.DEFINE_integer("resolution", 64, "Image side in pixels.", lower_bound=8)
_CROP = flags.DEFINE_enum("crop", "center", ["center", "random", "dvae"], "Crop mode.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 16, "Images in the grid.", lower_bound=1)
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 1000, "shapes: scenes to draw.")
_MAX_ITEMS = flags.DEFINE_integer("max_items", None, "Stop counting after this many records.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the dataset and the shuffle.")
_OUT = flags.DEFINE_string("out", "grid.png", "Where to write the grid PNG.")


def main(argv):
  del argv
  source = data.make_source(_DATASET.value, resolution=_RESOLUTION.value, path=_PATH.value,
                            split=_SPLIT.value, num_examples=_NUM_EXAMPLES.value,
                            seed=_SEED.value)
  config = pipeline.LoaderConfig(resolution=_RESOLUTION.value, batch_size=None, crop=_CROP.value,
                                 seed=_SEED.value, num_epochs=1, shuffle=True)
  loader = pipeline.Loader(source, config, process_index=0, process_count=1)
  shown = []
  total = len(source) if hasattr(source, "__len__") else None
  with tqdm.tqdm(total=total, unit="record", desc=f"reading {_DATASET.value}") as progress:
    for example in loader:
      if len(shown) < _NUM_IMAGES.value:
        shown.append(example)
      read = loader.counts["usable"] + loader.counts.skipped
      progress.update(read - progress.n)
      if _MAX_ITEMS.value and read >= _MAX_ITEMS.value:
        break
  grid = image_grid.captioned_grid([e["image"] for e in shown], [e["caption"] for e in shown])
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  grid.save(_OUT.value)
  counts = loader.counts
  print(f"{_DATASET.value}: {counts['usable']} usable pairs, {counts.skipped} skipped")
  for reason, count in sorted(counts.items()):
    if reason not in ("usable", "truncated_captions") and count:
      print(f"  skipped {reason}: {count}")
  print(f"wrote {len(shown)} examples to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
