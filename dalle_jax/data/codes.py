"""Pre-encoded datasets for stage 2: shards of (captions, dVAE codes) written by encode_dataset.py.

A shard is an `.npz` with `codes: int16[N, h, w]` (int32 when the codebook exceeds int16),
`captions: str[N]` (every usable caption of the image, newline-joined) and `keys: str[N]`.
Shards are written whole under a temporary name and renamed, so a directory never holds a partial
one; `progress-{host}.json` beside them records where each host's encoder stopped.
"""

from __future__ import annotations

import glob
import os

import numpy as np


def shard_path(directory: str, host: int, index: int) -> str:
  return os.path.join(directory, f"codes-{host:03d}-{index:05d}.npz")


def write_shard(path: str, codes: np.ndarray, captions: list[str], keys: list[str]) -> None:
  """Writes one shard atomically (temporary file, then rename)."""
  dtype = np.int16 if codes.max(initial=0) < 2 ** 15 else np.int32
  temporary = path + ".tmp.npz"
  np.savez(temporary, codes=codes.astype(dtype), captions=np.array(captions, dtype=str),
           keys=np.array(keys, dtype=str))
  os.replace(temporary, path)


def read_shards(directory: str) -> dict[str, np.ndarray]:
  """Every complete shard under `directory`, concatenated: codes int32[N, h, w], captions, keys."""
  paths = sorted(glob.glob(os.path.join(directory, "codes-*-*.npz")))
  paths = [p for p in paths if not p.endswith(".tmp.npz")]
  if not paths:
    raise FileNotFoundError(f"no code shards (codes-*.npz) in {directory}; run "
                            "experiments/encode_dataset.py first")
  parts = [np.load(p) for p in paths]
  return {"codes": np.concatenate([p["codes"] for p in parts]).astype(np.int32),
          "captions": np.concatenate([p["captions"] for p in parts]),
          "keys": np.concatenate([p["keys"] for p in parts])}
