"""dalle_jax/data/pipeline.py on a random-access source: seeds, hosts, workers, resume, tokens."""

import json

import numpy as np
import pytest

from dalle_jax.data import pipeline, records


def _source(n=24):
  """In-memory records whose pixels encode their index, each with two candidate captions."""
  return [records.RawRecord(f"r{i}", (f"record {i}", f"item {i}"),
                            np.full((12, 12, 3), i, np.uint8)) for i in range(n)]


def _loader(config, index=0, count=1, **kwargs):
  return pipeline.Loader(_source(), config, process_index=index, process_count=count, **kwargs)


def _keys(loader, batches=None):
  out = []
  for i, batch in enumerate(loader):
    if batches is not None and i == batches:
      break
    out.extend(batch["key"])
  return out


def test_batches_have_the_documented_shapes_and_types():
  batch = next(_loader(pipeline.LoaderConfig(resolution=8, batch_size=4)))
  assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.uint8
  assert batch["caption"].shape == (4,) and batch["key"].shape == (4,)
  index = int(batch["key"][0][1:])
  assert (batch["image"][0] == index).all()  # the pixels stay with their caption
  assert batch["caption"][0] in (f"record {index}", f"item {index}")


def test_an_epoch_is_a_permutation_that_depends_on_the_seed_and_changes_each_epoch():
  config = pipeline.LoaderConfig(resolution=8, batch_size=4, num_epochs=2, seed=0)
  keys = _keys(_loader(config))
  first, second = keys[:24], keys[24:]
  assert sorted(first) == sorted(second) == sorted(f"r{i}" for i in range(24))
  assert first != second and first != sorted(first, key=lambda k: int(k[1:]))
  assert keys == _keys(_loader(config))
  assert keys != _keys(_loader(pipeline.LoaderConfig(resolution=8, batch_size=4, num_epochs=2,
                                                     seed=1)))


def test_hosts_get_disjoint_halves_of_each_epoch():
  config = pipeline.LoaderConfig(resolution=8, batch_size=3, num_epochs=1)
  halves = [_keys(_loader(config, index=i, count=2)) for i in range(2)]
  assert len(halves[0]) == len(halves[1]) == 12
  assert sorted(halves[0] + halves[1]) == sorted(f"r{i}" for i in range(24))


def test_worker_processes_give_the_same_stream_as_decoding_in_process():
  config = pipeline.LoaderConfig(resolution=8, batch_size=4, num_epochs=2, seed=3)
  loader = _loader(pipeline.LoaderConfig(**{**config.__dict__, "num_workers": 2}))
  try:
    assert _keys(loader) == _keys(_loader(config))
  finally:
    loader.close()


def test_a_restored_loader_continues_exactly_where_the_first_stopped():
  config = pipeline.LoaderConfig(resolution=8, batch_size=5, seed=2)  # repeats forever
  reference = [(k, c) for b in [next(_loader(config)) for _ in range(1)] for k, c in
               zip(b["key"], b["caption"])]
  full = _loader(config)
  expected = [next(full) for _ in range(9)]
  interrupted = _loader(config)
  for _ in range(4):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.get_state()))
  resumed = _loader(config)
  resumed.set_state(state)
  for want in expected[4:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    assert list(got["caption"]) == list(want["caption"])
  assert resumed.counts["usable"] == 45
  assert reference == list(zip(expected[0]["key"], expected[0]["caption"]))


class _CharTokenizer:
  """Stands in for the SentencePiece tokenizer: one id per character, text_len 6."""

  def encode(self, caption, *, training=False, rng=None):
    ids = [ord(c) % 50 for c in caption]
    return np.array((ids + [50 + i for i in range(6)])[:6], np.int32), len(ids) > 6


def test_a_tokenizer_adds_tokens_and_truncations_are_counted():
  config = pipeline.LoaderConfig(resolution=8, batch_size=4, num_epochs=1)
  loader = _loader(config, tokenizer=_CharTokenizer())
  batches = list(loader)
  assert batches[0]["text"].shape == (4, 6) and batches[0]["text"].dtype == np.int32
  # Every caption ("record 7", "item 12") is longer than 6 characters except "item N" (N < 10).
  truncated = sum(int(b["truncated"].sum()) for b in batches)
  assert loader.counts["truncated_captions"] == truncated and 14 <= truncated <= 24


def test_bad_configs_are_refused_before_any_work():
  with pytest.raises(ValueError, match="crop must be one of"):
    pipeline.LoaderConfig(crop="squash")
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.LoaderConfig(batch_size=0)
  with pytest.raises(ValueError, match="process_index"):
    _loader(pipeline.LoaderConfig(), index=2, count=2)


def test_the_real_tokenizer_drops_out_only_when_asked():
  from dalle_jax import tokenizer as tokenizer_lib
  captions = [c for r in _source() for c in r.captions] * 4
  tok = tokenizer_lib.train_tokenizer(captions, vocab_size=280, text_len=16, dropout=0.5)
  plain = pipeline.LoaderConfig(resolution=8, batch_size=24, num_epochs=1, bpe_dropout=False)
  batch = next(_loader(plain, tokenizer=tok))
  expected = np.stack([tok.encode(c)[0] for c in batch["caption"]])
  np.testing.assert_array_equal(batch["text"], expected)
  dropped = next(_loader(pipeline.LoaderConfig(**{**plain.__dict__, "bpe_dropout": True}),
                         tokenizer=tok))
  assert (dropped["text"] != expected).any()
  assert [tok.decode(t) for t in dropped["text"]] == list(batch["caption"])
