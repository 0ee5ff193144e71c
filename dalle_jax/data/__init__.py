"""Image-caption datasets and the input pipeline.

Every dataset is a *source* of `records.RawRecord`s; `pipeline.Loader` decodes, crops, counts what
it skips and batches. `make_source` builds one by name, for absl flags such as `--dataset=emoji`.
"""

from __future__ import annotations

DATASETS = ("shapes", "emoji", "folder", "webdataset")


def make_source(name: str, *, resolution: int, path: str | None = None, split: str = "train",
                num_examples: int = 10_000, seed: int = 0):
  """The source called `name`.

  Args:
    name: one of `DATASETS`.
    resolution: pixels per side for the datasets that draw their images (shapes, emoji).
    path: the directory (folder) or shard paths / brace pattern (webdataset).
    split: `train` or `heldout` (shapes, emoji; emoji also `all`).
    num_examples: how many scenes to draw (shapes).
    seed: which scenes to draw (shapes); the loader's seed fixes everything else.
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
  if name in ("folder", "webdataset") and not path:
    raise ValueError(f"the {name} dataset needs --path (a directory, or .tar shards for "
                     "webdataset such as 'data/{00000..00099}.tar')")
  # Imported here so that a run only loads what its dataset needs.
  if name == "shapes":
    from dalle_jax.data.shapes import ShapesSource
    return ShapesSource(num_examples, resolution, seed=seed, split=split)
  if name == "emoji":
    from dalle_jax.data.emoji import EmojiSource
    return EmojiSource(resolution, split=split)
  if name == "folder":
    from dalle_jax.data.folder import FolderSource
    return FolderSource(path)
  from dalle_jax.data.webdataset import WebDatasetSource
  return WebDatasetSource(path.split(",") if "," in path else path, seed=seed)
