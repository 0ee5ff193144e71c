"""A user's directory tree of images with same-stem `.txt` captions, as DALLE-pytorch users keep data.

    photos/cat.jpg   photos/cat.txt   <- one caption a line; one line is drawn per epoch
    photos/sub/dog.png   photos/sub/dog.txt

Files are read lazily (in the loader's workers); only the directory listing happens up front.
An image without a caption file, or a caption file without an image, is kept as a record that the
pipeline counts as skipped, so every file of the tree is accounted for in the reported counts.
"""

from __future__ import annotations

import os

from dalle_jax.data import records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class FolderSource:
  """Random-access source of `RawRecord`s for every image or caption file under `root`."""

  def __init__(self, root: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"folder dataset: {root!r} is not a directory")
    self.root = root
    images, captions = {}, {}
    for directory, subdirs, files in os.walk(root):
      subdirs.sort()  # os.walk order is filesystem-dependent; records must be deterministic
      for name in sorted(files):
        stem, ext = os.path.splitext(os.path.join(directory, name))
        if ext.lower() in extensions:
          images.setdefault(stem, os.path.join(directory, name))
        elif ext.lower() == ".txt":
          captions[stem] = os.path.join(directory, name)
    self._entries = [(images.get(stem), captions.get(stem))
                     for stem in sorted(set(images) | set(captions))]
    if not any(image and caption for image, caption in self._entries):
      raise records.NoUsableDataError(
          f"folder dataset: no image under {root!r} has a caption file beside it "
          f"({len(images)} images, {len(captions)} .txt files). Put each caption in a .txt file "
          f"with the image's name, e.g. cat.jpg + cat.txt; image types: {', '.join(extensions)}.")

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, index: int) -> records.RawRecord:
    if not 0 <= index < len(self._entries):
      raise IndexError(f"index {index} out of range for {len(self._entries)} records")
    image_path, caption_path = self._entries[index]
    key = os.path.relpath(image_path or caption_path, self.root)
    if image_path is None:
      return records.RawRecord(key, (), None, skip=records.MISSING_IMAGE)
    if caption_path is None:
      return records.RawRecord(key, (), None, skip=records.MISSING_CAPTION)
    try:
      with open(caption_path, "rb") as f:
        caption_lines = tuple(f.read().splitlines())
      with open(image_path, "rb") as f:
        image = f.read()
    except OSError as e:
      return records.RawRecord(key, (), None, meta={"error": str(e)},
                               skip=records.UNREADABLE_FILE)
    return records.RawRecord(key, caption_lines, image, meta={"path": image_path})
