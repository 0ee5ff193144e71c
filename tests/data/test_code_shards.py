"""dalle_jax/data/code_shards.py: the stage-2 shard format, its random-access reader, npz conversion."""

import json

import numpy as np
import pytest

from dalle_jax.data import code_shards


def test_every_example_reads_back_exactly_from_several_shards(tmp_path):
  rng = np.random.default_rng(0)
  small = rng.integers(0, 8192, (5, 3, 4, 4))
  large = rng.integers(0, 2 ** 20, (3, 3, 4, 4))  # past int16: stored as int32
  captions = ["one", "two\nsecond of two", "tab\there", "caf\u00e9", "x", "y", "z", "w"]
  keys = [f"key-{i}" for i in range(8)]
  code_shards.write_shard(code_shards.shard_path(tmp_path, 0, 0), small, captions[:5], keys[:5])
  code_shards.write_shard(code_shards.shard_path(tmp_path, 1, 0), large, captions[5:], keys[5:])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["codes-000-00000.codes",
                                                        "codes-001-00000.codes"]  # no .tmp left
  shards = code_shards.CodeShards(tmp_path)
  assert len(shards) == 8 and shards.augmentations == 3 and shards.grid == (4, 4)
  for i in (7, 0, 3, 5, 1):  # any order: random access
    example = shards[i]
    np.testing.assert_array_equal(example["codes"], np.concatenate([small, large])[i])
    assert example["codes"].dtype == np.int32
    assert example["captions"] == captions[i].split("\n") and example["key"] == keys[i]
  with pytest.raises(IndexError, match=r"\[0, 8\)"):
    shards[8]
  everything = code_shards.read_all(tmp_path)
  assert everything["codes"].shape == (8, 3, 4, 4) and list(everything["captions"]) == captions


def test_mixed_directories_and_foreign_files_are_refused(tmp_path):
  code_shards.write_shard(code_shards.shard_path(tmp_path, 0, 0), np.zeros((2, 4, 4), int),
                          ["a", "b"], ["0", "1"])
  code_shards.write_shard(code_shards.shard_path(tmp_path, 0, 1), np.zeros((2, 8, 8), int),
                          ["a", "b"], ["0", "1"])
  with pytest.raises(ValueError, match="one encode_dataset.py run"):
    code_shards.CodeShards(tmp_path)
  other = tmp_path / "other"
  other.mkdir()
  (other / "codes-000-00000.codes").write_bytes(json.dumps({"count": 2}).encode())
  with pytest.raises(ValueError, match="is not a code shard"):
    code_shards.CodeShards(other)
  with pytest.raises(ValueError, match=r"\[n, K, h, w\]"):
    code_shards.write_shard(tmp_path / "bad.codes", np.zeros((2, 4)), ["a", "b"], ["0", "1"])
