"""dalle_jax/data/code_batches.py: stage-2 batches that stream, shuffle, split over hosts and resume."""

import importlib
import json
import re

from fsspec.implementations.memory import MemoryFileSystem
from etils import epath
import numpy as np
import pytest

from dalle_jax import tokenizer as tokenizer_lib
from dalle_jax.data import code_shards
from dalle_jax.data.code_batches import CodeBatches

N, K, BATCH = 50, 2, 8  # 6 batches an epoch; 2 examples of each epoch's order left out


def _captions(i):
  return [f"a red circle number {i}", f"a blue square beside {i} stars"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  # dropout 0.5: segmentations differ visibly between draws
  return tokenizer_lib.train_tokenizer([c for i in range(N) for c in _captions(i)], 300, 12,
                                       str(tmp_path_factory.mktemp("tok")), dropout=0.5)


def _write(directory, count=N, per_shard=20):
  """Example i's encoding k is a 2x2 grid filled with i * K + k."""
  codes = np.arange(count * K)[:, None, None].repeat(4, 1).reshape(count, K, 2, 2)
  for index, start in enumerate(range(0, count, per_shard)):
    part = slice(start, min(count, start + per_shard))
    code_shards.write_shard(code_shards.shard_path(directory, 0, index), codes[part],
                            ["\n".join(_captions(i)) for i in range(count)][part],
                            [str(i) for i in range(count)][part])
  return directory


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return code_shards.CodeShards(_write(tmp_path_factory.mktemp("codes")))


def _take(batches, steps):
  return [next(batches) for _ in range(steps)]


def test_each_epoch_is_a_new_permutation_reading_encoding_epoch_mod_k(shards, tokenizer):
  batches = CodeBatches(shards, tokenizer, BATCH, seed=3)
  assert len(batches) == 6
  orders = []
  for epoch in range(3):
    values = np.concatenate([b["codes"][:, 0, 0] for b in _take(batches, 6)])
    assert batches.get_state()["epoch"] == epoch
    examples, encodings = np.divmod(values, K)
    assert len(set(examples)) == 6 * BATCH  # no example twice in an epoch
    assert (encodings == epoch % K).all()  # a different augmented crop each epoch
    orders.append(list(examples))
  assert orders[0] != orders[1] != orders[2] and orders[0] != orders[2]
  # Over the epochs every example appears: the left-out two differ between epochs.
  assert set().union(*map(set, orders)) == set(range(N))


def test_captions_and_dropout_come_from_seed_epoch_and_example(shards, tokenizer):
  batch = next(CodeBatches(shards, tokenizer, BATCH, seed=3))
  for text, value in zip(batch["text"], batch["codes"][:, 0, 0]):
    example = int(value) // K
    rng = np.random.default_rng([3, 0, example])
    caption = _captions(example)[rng.integers(2)]
    np.testing.assert_array_equal(text, tokenizer.encode(caption, training=True, rng=rng)[0])
  assert batch["text"].dtype == np.int32 and batch["codes"].shape == (BATCH, 2, 2)


def test_resume_from_a_json_state_equals_an_uninterrupted_run(shards, tokenizer):
  uninterrupted = CodeBatches(shards, tokenizer, BATCH, seed=1)
  straight = _take(uninterrupted, 10)
  first = CodeBatches(shards, tokenizer, BATCH, seed=1)
  _take(first, 7)  # past an epoch boundary
  state = json.loads(json.dumps(first.get_state()))
  assert state["step"] == 7 and state["epoch"] == 1
  second = CodeBatches(shards, tokenizer, BATCH, seed=1)
  second.set_state(state)
  for expected, got in zip(straight[7:], _take(second, 3)):
    np.testing.assert_array_equal(got["text"], expected["text"])
    np.testing.assert_array_equal(got["codes"], expected["codes"])
  assert second.get_state() == uninterrupted.get_state()  # truncation counts travel too
  with pytest.raises(ValueError, match="new workdir"):
    second.set_state({"epoch": 0, "position": 16})


def test_two_hosts_read_disjoint_halves_of_the_same_global_batch(shards, tokenizer):
  whole = _take(CodeBatches(shards, tokenizer, BATCH, seed=2), 8)
  hosts = [_take(CodeBatches(shards, tokenizer, BATCH, seed=2, process_index=h, process_count=2),
                 8) for h in range(2)]
  seen = []
  for step, batch in enumerate(whole):
    for key in ("text", "codes"):
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][step][key], hosts[1][step][key]]), batch[key])
    first, second = (set(hosts[h][step]["codes"][:, 0, 0] // K) for h in range(2))
    assert len(first) == len(second) == BATCH // 2 and not first & second
    seen.extend(first | second)
  assert len(set(seen[:6 * BATCH])) == 6 * BATCH  # the first epoch, covered by the two hosts


def test_evaluation_is_one_ordered_pass_of_first_captions_without_dropout(shards, tokenizer):
  batches = list(CodeBatches(shards, tokenizer, BATCH, training=False))
  assert len(batches) == 6  # 50 // 8: no partial batch
  codes = np.concatenate([b["codes"] for b in batches])
  np.testing.assert_array_equal(codes[:, 0, 0], np.arange(48) * K)  # in order, encoding 0
  expected = np.stack([tokenizer.encode(_captions(i)[0])[0] for i in range(48)])
  np.testing.assert_array_equal(np.concatenate([b["text"] for b in batches]), expected)


def _rss_bytes() -> int:
  with open("/proc/self/status") as f:
    return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


def test_memory_stays_flat_reading_a_dataset_several_times_the_cap(tmp_path, tokenizer):
  count, grid = 16_000, 64
  codes = np.random.default_rng(0).integers(0, 8192, (1000, 1, grid, grid))
  for index in range(count // 1000):  # 1,000 examples a shard, 8 KiB of int16 codes each
    code_shards.write_shard(code_shards.shard_path(tmp_path, 0, index), codes,
                            ["a red circle"] * 1000, [str(i) for i in range(1000)])
  del codes
  data_bytes = sum(p.stat().st_size for p in tmp_path.iterdir())
  cap = 24 * 2 ** 20  # the reading threads' buffers and prefetched rows
  assert data_bytes > 5 * cap
  next(CodeBatches(code_shards.CodeShards(tmp_path), tokenizer, 64, seed=1))  # threads, imports
  start, peak = _rss_bytes(), 0
  batches = CodeBatches(code_shards.CodeShards(tmp_path), tokenizer, 64, seed=0)
  for _ in range(count // 64):  # a whole epoch
    batch = next(batches)
    peak = max(peak, _rss_bytes() - start)
  assert batch["codes"].shape == (64, grid, grid)
  assert peak < cap, f"RSS grew by {peak / 2 ** 20:.1f} MiB reading {data_bytes / 2 ** 20:.0f} MiB"


class _OfflineGcs(MemoryFileSystem):
  """fsspec's in-memory filesystem, answering for gs:// as gcsfs would."""
  protocol = ("gs", "gcs")
  store, pseudo_dirs = {}, [""]


@pytest.fixture
def offline_gcs(monkeypatch):
  """gs:// paths through etils.epath's real fsspec backend, stored in memory."""
  from etils.epath import backend
  for name in ("gs", "gcs"):
    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, name, _OfflineGcs)
  backend.fsspec_backend._get_filesystem.cache_clear()
  yield
  backend.fsspec_backend._get_filesystem.cache_clear()
  _OfflineGcs.store.clear()


def test_codes_and_tokenizer_on_gcs_read_like_local_ones(offline_gcs, shards, tokenizer):
  tokenizer.save("gs://bucket/run/tokenizer")
  _write("gs://bucket/run/codes")
  assert any(k.endswith("codes-000-00002.codes") for k in _OfflineGcs.store)  # really in memory
  remote_tokenizer = tokenizer_lib.Tokenizer.load("gs://bucket/run/tokenizer")
  remote = code_shards.CodeShards(epath.Path("gs://bucket/run/codes"))
  assert len(remote) == N
  local_batches = _take(CodeBatches(shards, tokenizer, BATCH, seed=4), 3)
  for expected, got in zip(local_batches,
                           _take(CodeBatches(remote, remote_tokenizer, BATCH, seed=4), 3)):
    np.testing.assert_array_equal(got["text"], expected["text"])
    np.testing.assert_array_equal(got["codes"], expected["codes"])
