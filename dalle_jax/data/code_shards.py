"""Stage-2 data on disk: shards of (key, captions, dVAE codes) with random access, on any filesystem.

encode_dataset.py writes them; `CodeShards` reads them as a Grain random-access source. A shard
`codes-{host:03d}-{index:05d}.codes` holds n examples, each with K encodings of its image (K
augmented crops, or one centre crop):

    MAGIC | header length: uint64 | header: JSON {"count", "augmentations", "grid", "dtype"}
    codes: dtype[n, K, h, w]         fixed width: example i sits at a computed offset
    text offsets: uint64[n + 1]      where each example's text starts in the text section
    text: per example the UTF-8 JSON [key, [caption, ...]]

so reading example i takes three small reads and no per-example index in memory: a reader holds
one header per shard, whatever the number of examples. ArrayRecord is not used because its reader
opens local files only (google/array_record#120) and keeps each file's chunk index in memory.

Paths go through `etils.epath`, so `gs://` (and any filesystem epath reaches) works. A shard is
written whole under a temporary name and renamed, so a directory never holds a partial one;
`progress-{host}.json` beside them records where each host's encoder stopped.
"""

from __future__ import annotations

import bisect
import collections
import json
import struct
import threading
from typing import Any, Sequence

from etils import epath
import numpy as np

MAGIC = b"DALLE-JAX CODES 1\n"
SUFFIX = ".codes"
_LENGTH = struct.Struct("<Q")
_OPEN_FILES_PER_THREAD = 16  # reads jump between shards; bounds the handles a thread keeps


def shard_path(directory: epath.PathLike, host: int, index: int) -> epath.Path:
  return epath.Path(directory) / f"codes-{host:03d}-{index:05d}{SUFFIX}"


def _is_shard(name: str, suffix: str = SUFFIX) -> bool:
  return name.startswith("codes-") and name.endswith(suffix) and ".tmp" not in name


def list_shards(directory: epath.PathLike, suffix: str = SUFFIX) -> list[epath.Path]:
  """The complete shards in `directory`, in name order (host, then index)."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted((p for p in directory.iterdir() if _is_shard(p.name, suffix)), key=lambda p: p.name)


def write_shard(path: epath.PathLike, codes: np.ndarray, captions: Sequence[str | Sequence[str]],
                keys: Sequence[str]) -> None:
  """Writes one shard atomically (temporary file, then rename).

  Args:
    codes: `int[n, K, h, w]` (K encodings per example) or `int[n, h, w]` (one).
    captions: per example its captions, as a list or newline-joined.
    keys: per example its key in the source dataset.
  """
  codes = np.asarray(codes)
  if codes.ndim == 3:
    codes = codes[:, None]
  if codes.ndim != 4 or not len(codes) == len(captions) == len(keys):
    raise ValueError(f"codes {codes.shape} must be [n, K, h, w] (or [n, h, w]) with one caption "
                     f"list and key per example; got {len(captions)} captions, {len(keys)} keys")
  dtype = np.dtype("<i2") if codes.max(initial=0) < 2 ** 15 else np.dtype("<i4")
  texts = [json.dumps([str(key), c.split("\n") if isinstance(c, str) else list(c)]).encode()
           for key, c in zip(keys, captions)]
  offsets = np.concatenate([[0], np.cumsum([len(t) for t in texts])]).astype("<u8")
  header = json.dumps({"count": len(codes), "augmentations": codes.shape[1],
                       "grid": list(codes.shape[2:]), "dtype": dtype.str}).encode()
  path = epath.Path(path)
  temporary = path.parent / (path.name + ".tmp")
  with temporary.open("wb") as f:
    f.write(MAGIC + _LENGTH.pack(len(header)) + header)
    f.write(codes.astype(dtype).tobytes())
    f.write(offsets.tobytes())
    f.write(b"".join(texts))
  temporary.replace(path)


class _Shard:
  """One shard's header and where its sections start."""

  def __init__(self, path: epath.Path):
    self.path = path
    with path.open("rb") as f:
      start = f.read(len(MAGIC) + _LENGTH.size)
      if start[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{path} is not a code shard (it does not start with {MAGIC!r})")
      (length,) = _LENGTH.unpack(start[len(MAGIC):])
      header = json.loads(f.read(length))
    self.count = int(header["count"])
    self.augmentations = int(header["augmentations"])
    self.grid = tuple(header["grid"])
    self.dtype = np.dtype(header["dtype"])
    self.record_bytes = self.augmentations * int(np.prod(self.grid)) * self.dtype.itemsize
    self.codes_start = len(MAGIC) + _LENGTH.size + length
    self.offsets_start = self.codes_start + self.count * self.record_bytes
    self.text_start = self.offsets_start + (self.count + 1) * 8


class CodeShards:
  """Every shard in a directory as one random-access source (Grain's `RandomAccessDataSource`).

      shards = CodeShards("gs://bucket/codes")
      shards[i]   # {"key": str, "captions": [str, ...], "codes": int32[K, h, w]}

  Memory: one header per shard and, per reading thread, up to 16 open files.
  """

  def __init__(self, directory: epath.PathLike):
    self.directory = epath.Path(directory)
    paths = list_shards(self.directory)
    if not paths:
      if list_shards(self.directory, ".npz"):
        raise FileNotFoundError(
            f"{directory} holds .npz code shards, a format this reader does not read; convert "
            f"them with: python experiments/encode_dataset.py --convert_npz={directory} "
            "--out_dir=NEW_DIR")
      raise FileNotFoundError(f"no code shards (codes-*{SUFFIX}) in {directory}; run "
                              "experiments/encode_dataset.py first")
    self._shards = [_Shard(p) for p in paths]
    first = self._shards[0]
    for shard in self._shards:
      if (shard.augmentations, shard.grid) != (first.augmentations, first.grid):
        raise ValueError(f"{shard.path} holds {shard.augmentations} encodings of {shard.grid} "
                         f"codes, {first.path} {first.augmentations} of {first.grid}: one "
                         "directory must come from one encode_dataset.py run")
    self.augmentations, self.grid = first.augmentations, first.grid
    self._ends = np.cumsum([s.count for s in self._shards]).tolist()
    self._local = threading.local()

  def __len__(self) -> int:
    return self._ends[-1]

  def __repr__(self) -> str:
    return f"CodeShards({self.directory}, {len(self)} examples, {len(self._shards)} shards)"

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    del state["_local"]  # open files stay with their process
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._local = threading.local()

  def _file(self, shard: _Shard):
    files = getattr(self._local, "files", None)
    if files is None:
      files = self._local.files = collections.OrderedDict()
    if shard.path in files:
      files.move_to_end(shard.path)
    else:
      if len(files) >= _OPEN_FILES_PER_THREAD:
        files.popitem(last=False)[1].close()
      files[shard.path] = shard.path.open("rb")
    return files[shard.path]

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"example {index} is not in [0, {len(self)})")
    which = bisect.bisect_right(self._ends, index)
    shard = self._shards[which]
    row = index - (self._ends[which - 1] if which else 0)
    f = self._file(shard)
    f.seek(shard.codes_start + row * shard.record_bytes)
    codes = np.frombuffer(f.read(shard.record_bytes), shard.dtype)
    f.seek(shard.offsets_start + row * 8)
    begin, end = np.frombuffer(f.read(16), "<u8")
    f.seek(shard.text_start + int(begin))
    key, captions = json.loads(f.read(int(end - begin)))
    return {"key": key, "captions": captions,
            "codes": codes.reshape(shard.augmentations, *shard.grid).astype(np.int32)}


def read_all(directory: epath.PathLike) -> dict[str, np.ndarray]:
  """Every example in memory (small directories: tests, the demo's statistics): `codes:
  int32[N, K, h, w]`, `captions: str[N]` (newline-joined), `keys: str[N]`."""
  shards = CodeShards(directory)
  examples = [shards[i] for i in range(len(shards))]
  return {"codes": np.stack([e["codes"] for e in examples]),
          "captions": np.array(["\n".join(e["captions"]) for e in examples], dtype=str),
          "keys": np.array([e["key"] for e in examples], dtype=str)}


def convert_npz(old_dir: epath.PathLike, new_dir: epath.PathLike) -> int:
  """Rewrites a directory of `.npz` code shards (one encoding per example) in this format, shard by
  shard under the same names, with the encoder's progress files; returns the number of examples."""
  paths = list_shards(old_dir, ".npz")
  if not paths:
    raise FileNotFoundError(f"no .npz code shards (codes-*.npz) in {old_dir}")
  new_dir = epath.Path(new_dir)
  new_dir.mkdir(parents=True, exist_ok=True)
  total = 0
  for path in paths:
    with path.open("rb") as f:
      arrays = np.load(f)
      codes, captions, keys = arrays["codes"], arrays["captions"], arrays["keys"]
    write_shard(new_dir / (path.name[:-len(".npz")] + SUFFIX), codes,
                [str(c) for c in captions], [str(k) for k in keys])
    total += len(codes)
  for path in epath.Path(old_dir).iterdir():
    if path.name.startswith("progress-") and path.name.endswith(".json"):
      (new_dir / path.name).write_text(path.read_text())
  return total
