"""dalle_jax/data/webdataset.py: img2dataset-style tar shards, streamed, split and resumable."""

import json
import os

import pytest

from conftest import encode_image, random_pixels, write_tar
from dalle_jax.data import pipeline, records, webdataset

NUM_SHARDS, PER_SHARD = 4, 5


@pytest.fixture
def shards(tmp_path):
  """4 shards of 5 good samples each (jpg/png/webp, .json sidecars), keys s{shard}_{i}."""
  for shard in range(NUM_SHARDS):
    members = {}
    for i in range(PER_SHARD):
      key, fmt = f"s{shard}_{i}", ("jpg", "png", "webp")[i % 3]
      pixels = random_pixels(shard * 10 + i)
      members[f"{key}.{fmt}"] = encode_image(pixels, {"jpg": "JPEG"}.get(fmt, fmt.upper()))
      members[f"{key}.txt"] = f"caption {shard} {i}".encode()
      members[f"{key}.json"] = json.dumps({"url": f"http://x/{key}"}).encode()
    write_tar(str(tmp_path / f"{shard:05d}.tar"), members)
  return str(tmp_path / "{00000..00003}.tar")


def _keys(loader):
  return [key for batch in loader for key in batch["key"]]


def _config(**overrides):
  return pipeline.LoaderConfig(**{"resolution": 8, "batch_size": 2, "num_epochs": 1,
                                  "shuffle_window": 4, **overrides})


def test_brace_pattern_expands_and_missing_shards_are_named(shards, tmp_path):
  assert [os.path.basename(p) for p in webdataset.expand_urls(shards)] == [
      "00000.tar", "00001.tar", "00002.tar", "00003.tar"]
  with pytest.raises(FileNotFoundError, match="00004.tar"):
    webdataset.expand_urls(str(tmp_path / "{00000..00004}.tar"))


def test_records_group_members_by_key_with_json_sidecars(shards):
  first = next(webdataset.read_shard(webdataset.expand_urls(shards)[0]))
  assert first.key == "00000.tar/s0_0" and first.captions == (b"caption 0 0",)
  assert first.meta["json"] == {"url": "http://x/s0_0"}


def test_one_epoch_reads_every_sample_once(shards):
  loader = pipeline.Loader(webdataset.WebDatasetSource(shards), _config(),
                           process_index=0, process_count=1)
  keys = _keys(loader)
  assert sorted(keys) == sorted(f"{s:05d}.tar/s{s}_{i}" for s in range(4) for i in range(5))
  assert loader.counts == {"usable": 20, "truncated_captions": 0}


def test_hosts_and_workers_get_disjoint_shares_that_cover_everything(shards):
  source = webdataset.WebDatasetSource(shards)
  host_keys = [_keys(pipeline.Loader(source, _config(num_workers=2), process_index=i,
                                     process_count=2)) for i in range(2)]
  assert not set(host_keys[0]) & set(host_keys[1])
  assert len(host_keys[0]) == len(host_keys[1]) == 10
  # Host 0 holds shards 0 and 2; each of its two workers streams one of them.
  assert {k.split("/")[0] for k in host_keys[0]} == {"00000.tar", "00002.tar"}
  with pytest.raises(ValueError, match="at least 8 shards"):
    pipeline.Loader(source, _config(), process_index=0, process_count=8)


def test_seed_fixes_the_order_and_a_restored_iterator_continues_exactly(shards):
  source = webdataset.WebDatasetSource(shards)
  config = _config(num_epochs=2, seed=7)
  reference = _keys(pipeline.Loader(source, config, process_index=0, process_count=1))
  assert reference == _keys(pipeline.Loader(source, config, process_index=0, process_count=1))
  assert reference != _keys(pipeline.Loader(source, _config(num_epochs=2, seed=8),
                                            process_index=0, process_count=1))
  interrupted = pipeline.Loader(source, config, process_index=0, process_count=1)
  head = [key for _ in range(7) for key in next(interrupted)["key"]]  # stops mid-shard
  state = json.loads(json.dumps(interrupted.get_state()))  # the state is plain JSON
  resumed = pipeline.Loader(source, config, process_index=0, process_count=1)
  resumed.set_state(state)
  assert head + _keys(resumed) == reference
  assert resumed.counts["usable"] == 40


def test_bad_samples_and_a_broken_shard_are_skipped_and_counted(tmp_path, bad_and_good_files):
  files, expected = bad_and_good_files
  members = {}
  for stem, (image, caption) in sorted(files.items()):
    if image is not None:
      members[f"{stem}.png"] = image
    if caption is not None:
      members[f"{stem}.txt"] = caption
  write_tar(str(tmp_path / "good.tar"), members)
  whole = open(write_tar(str(tmp_path / "whole.tar"), members), "rb").read()
  with open(tmp_path / "broken.tar", "wb") as f:
    f.write(whole[: len(whole) // 2 + 100])  # cut off mid-member
  source = webdataset.WebDatasetSource([str(tmp_path / "good.tar"), str(tmp_path / "broken.tar")])
  loader = pipeline.Loader(source, _config(batch_size=None, shuffle=False),
                           process_index=0, process_count=1)
  examples = list(loader)
  assert loader.counts["unreadable_file"] == 1
  for reason, count in expected.items():
    assert loader.counts[reason] >= count  # the broken shard adds some before it breaks
  good_only = pipeline.Loader(webdataset.WebDatasetSource(str(tmp_path / "good.tar")),
                              _config(batch_size=None, shuffle=False),
                              process_index=0, process_count=1)
  assert len(list(good_only)) == expected["usable"]
  assert {k: v for k, v in good_only.counts.items() if v} == expected
  assert len(examples) >= expected["usable"]


def test_shards_with_nothing_usable_are_a_clear_error(tmp_path):
  write_tar(str(tmp_path / "bad.tar"), {"a.jpg": b"not a jpeg", "a.txt": b"x", "b.txt": b"y"})
  loader = pipeline.Loader(webdataset.WebDatasetSource(str(tmp_path / "bad.tar")),
                           _config(batch_size=None), process_index=0, process_count=1)
  with pytest.raises(records.NoUsableDataError, match="corrupt_image=1.*missing_image=1"):
    list(loader)
