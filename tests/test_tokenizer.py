"""Tests for dalle_jax/tokenizer.py and experiments/train_tokenizer.py."""

import concurrent.futures
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from dalle_jax import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_LEN = 24
VOCAB_SIZE = 360
WORDS = ("a an the red green blue yellow purple orange black white big small tiny circle square "
         "triangle star hexagon heart on left right top bottom of next to above below and with "
         "café naïve über crème 🍰 🎉 日本 42 7 3.14 x-ray it's (big) \"quoted\" 50% #1 a/b").split()


def _captions(seed: int, count: int, max_words: int = 12) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=rng.integers(1, max_words + 1))) for _ in range(count)]


# Punctuation, digits, mixed case, accents, emoji and scripts never seen in training.
HARD_CAPTIONS = [
    "A Red Circle, next to: a BLUE square!",
    "3 cats & 2 dogs (maybe 4?) -- 100% sure; #1 [really] {ok} <tag> a/b\\c ~^`|@$*+=_",
    "crème brûlée on a plate, naïve café über alles",
    "an emoji 🦊 fox, a 👩‍🚀 astronaut, a 🇫🇷 flag and a ❤️ heart",
    "жёлтый квадрат, 黄色い四角, مربع أصفر, κίτρινο τετράγωνο",
    "€5 or £4 or ¥300; 1/2 ≤ 3 × 4 ÷ 5 → ∞",
    "x",
    "'quoted' \"double\" «guillemets» „low“",
]


@pytest.fixture(scope="module")
def tok() -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.train_tokenizer(_captions(0, 400), VOCAB_SIZE, TEXT_LEN)


# --- Training ---------------------------------------------------------------------------------


def test_trained_sizes(tok):
  assert tok.vocab_size == VOCAB_SIZE
  assert tok.text_len == TEXT_LEN
  assert tok.num_text_tokens == VOCAB_SIZE + TEXT_LEN
  np.testing.assert_array_equal(tok.pad_ids, VOCAB_SIZE + np.arange(TEXT_LEN))
  assert tok.pad_ids.dtype == np.int32
  assert tok.dropout == 0.1


def test_training_is_deterministic_and_lowercases(tok):
  again = tokenizer_lib.train_tokenizer(_captions(0, 400), VOCAB_SIZE, TEXT_LEN)
  assert again.model_proto == tok.model_proto
  upper = tokenizer_lib.train_tokenizer([c.upper() for c in _captions(0, 400)], VOCAB_SIZE,
                                        TEXT_LEN)
  assert upper.model_proto == tok.model_proto


def test_vocab_size_errors_say_what_to_do():
  captions = _captions(0, 50)
  with pytest.raises(ValueError, match=r"Pass vocab_size <= \d+, or train on more captions"):
    tokenizer_lib.train_tokenizer(captions, 5000, TEXT_LEN)
  with pytest.raises(ValueError, match=r"too small.*Pass vocab_size >= \d+"):
    tokenizer_lib.train_tokenizer(captions, 100, TEXT_LEN)
  with pytest.raises(ValueError, match="No non-empty captions"):
    tokenizer_lib.train_tokenizer(["", "  "], 300, TEXT_LEN)


# --- Encoding and decoding --------------------------------------------------------------------


def test_round_trip_lowercases(tok):
  captions = _captions(1, 300, max_words=5) + HARD_CAPTIONS
  long_text = tokenizer_lib.Tokenizer(tok.model_proto, 4096)
  for caption in captions:
    ids, truncated = long_text.encode(caption)
    assert not truncated
    assert long_text.decode(ids) == caption.lower()
    # Byte fallback: nothing maps to <unk>.
    assert tok._sp.unk_id() not in ids


def test_unseen_characters_fall_back_to_bytes(tok):
  ids, _ = tok.encode("🦊")
  text_ids = [int(i) for i in ids if i < tok.vocab_size]
  assert [tok._sp.id_to_piece(i) for i in text_ids] == ["▁", "<0xF0>", "<0x9F>", "<0xA6>",
                                                        "<0x8A>"]
  assert tok.decode(ids) == "🦊"


def test_normalization():
  assert tokenizer_lib.normalize_caption("  Two   SPACES\tand\na newline ") == (
      "two spaces and a newline")
  # NFKC folds full-width and compatibility characters before lowercasing.
  assert tokenizer_lib.normalize_caption("ＡＢＣ ﬁ ℌ") == "abc fi h"
  assert tokenizer_lib.normalize_caption("Keep Case", lowercase=False) == "Keep Case"


def test_padding_and_truncation(tok):
  ids, truncated = tok.encode("a red circle")
  n = len(tok.pieces("a red circle"))
  assert 0 < n < TEXT_LEN and not truncated
  assert ids.shape == (TEXT_LEN,) and ids.dtype == np.int32
  assert np.all(ids[:n] < tok.vocab_size)
  np.testing.assert_array_equal(ids[n:], tok.vocab_size + np.arange(n, TEXT_LEN))

  for empty in ("", "   \n"):
    ids, truncated = tok.encode(empty)
    np.testing.assert_array_equal(ids, tok.pad_ids)
    assert not truncated
    assert tok.decode(ids) == ""

  long_caption = " ".join(["a purple hexagon above a tiny star"] * 10)
  ids, truncated = tok.encode(long_caption)
  assert truncated
  assert np.all(ids < tok.vocab_size)
  untruncated, _ = tokenizer_lib.Tokenizer(tok.model_proto, 4096).encode(long_caption)
  np.testing.assert_array_equal(ids, untruncated[:TEXT_LEN])
  assert long_caption.lower().startswith(tok.decode(ids))

  batch, num_truncated = tok.encode_batch(["a red circle", long_caption, "", long_caption])
  assert batch.shape == (4, TEXT_LEN) and batch.dtype == np.int32
  assert num_truncated == 2
  for row, caption in zip(batch, ["a red circle", long_caption, "", long_caption]):
    np.testing.assert_array_equal(row, tok.encode(caption)[0])
  empty_batch, num_truncated = tok.encode_batch([])
  assert empty_batch.shape == (0, TEXT_LEN) and num_truncated == 0


def test_decode_ignores_every_pad_id(tok):
  ids, _ = tok.encode("a blue star")
  shuffled = np.concatenate([tok.pad_ids[:3], ids, [tok.num_text_tokens - 1]])
  assert tok.decode(shuffled) == "a blue star"


# --- BPE-dropout ------------------------------------------------------------------------------


def _random_strings(seed: int, count: int, alphabet: str) -> list[str]:
  rng = np.random.default_rng(seed)
  return ["".join(rng.choice(list(alphabet), size=rng.integers(0, 60))) for _ in range(count)]


@pytest.fixture(scope="module")
def deep_tok() -> tokenizer_lib.Tokenizer:
  """Long merge chains over runs of few letters, where ties and overlaps decide the merges."""
  return tokenizer_lib.train_tokenizer(_random_strings(0, 500, "aaabbc  d"), 1500, TEXT_LEN)


@pytest.mark.parametrize("model", ["tok", "deep_tok"])
def test_dropout_zero_is_sentencepiece_bpe(model, request):
  # Our merge loop without dropout must reproduce SentencePiece's own encoding exactly.
  tok = request.getfixturevalue(model)
  rng = np.random.default_rng(0)
  captions = (_captions(2, 1000) + HARD_CAPTIONS + _random_strings(1, 1000, "aaabbc  dé🍰")
              + _random_strings(2, 500, "abcdefghijklmnopqrstuvwxyz éü🍰'.,"))
  for caption in captions:
    text = tokenizer_lib.normalize_caption(caption)
    assert tok._bpe.encode(text, 0.0, rng) == tok._sp.encode(text), caption


def test_eval_encoding_never_varies(tok):
  for caption in _captions(3, 20):
    first, _ = tok.encode(caption)
    for seed in range(3):
      np.testing.assert_array_equal(
          tok.encode(caption, rng=np.random.default_rng(seed))[0], first)


def test_dropout_varies_training_encodings_reproducibly(tok):
  captions = _captions(4, 20, max_words=5)
  long_text = tokenizer_lib.Tokenizer(tok.model_proto, 4096)  # byte fallback makes long texts
  distinct = 0
  for caption in captions + HARD_CAPTIONS:
    encodings = {tuple(long_text.encode(caption, training=True, rng=np.random.default_rng(s))[0])
                 for s in range(8)}
    distinct += len(encodings) > 1
    for ids in encodings:
      assert long_text.decode(np.array(ids)) == caption.lower()
  assert distinct >= 2

  a, _ = tok.encode_batch(captions, training=True, rng=np.random.default_rng(7))
  b, _ = tok.encode_batch(captions, training=True, rng=np.random.default_rng(7))
  np.testing.assert_array_equal(a, b)
  eval_ids, _ = tok.encode_batch(captions)
  assert not np.array_equal(a, eval_ids)
  # Dropout skips merges, so on average it yields more, shorter pieces.
  assert (a < tok.vocab_size).sum() > (eval_ids < tok.vocab_size).sum()


def test_training_without_rng_is_refused(tok):
  with pytest.raises(ValueError, match="needs an rng"):
    tok.encode("a red circle", training=True)
  no_dropout = tokenizer_lib.Tokenizer(tok.model_proto, TEXT_LEN, dropout=0.0)
  np.testing.assert_array_equal(no_dropout.encode("a red circle", training=True)[0],
                                tok.encode("a red circle")[0])


def test_dropout_is_thread_safe(tok):
  captions = _captions(5, 64)

  def encode(seed):
    return tok.encode_batch(captions, training=True, rng=np.random.default_rng(seed))[0]

  expected = [encode(seed) for seed in range(8)]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    got = list(pool.map(encode, range(8)))
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(e, g)


# --- Saving, loading, pickling ----------------------------------------------------------------


def test_save_load_round_trip(tok, tmp_path):
  tok.save(tmp_path / "run")
  assert sorted(os.listdir(tmp_path / "run")) == ["tokenizer.json", "tokenizer.model"]
  config = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
  assert config == {"format_version": 1, "vocab_size": VOCAB_SIZE, "text_len": TEXT_LEN,
                    "dropout": 0.1, "lowercase": True}
  loaded = tokenizer_lib.Tokenizer.load(tmp_path / "run")
  assert loaded.model_proto == tok.model_proto
  captions = _captions(6, 50) + HARD_CAPTIONS
  np.testing.assert_array_equal(loaded.encode_batch(captions)[0], tok.encode_batch(captions)[0])
  np.testing.assert_array_equal(
      loaded.encode_batch(captions, training=True, rng=np.random.default_rng(1))[0],
      tok.encode_batch(captions, training=True, rng=np.random.default_rng(1))[0])
  assert tokenizer_lib.Tokenizer.load(tmp_path / "run", dropout=0.0).dropout == 0.0


def test_load_names_the_missing_file(tok, tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.model is missing"):
    tokenizer_lib.Tokenizer.load(tmp_path)
  tok.save(tmp_path)
  os.remove(tmp_path / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
    tokenizer_lib.Tokenizer.load(tmp_path)


def test_pickle_round_trip(tok):
  # The input pipeline ships the tokenizer to worker processes.
  copy = pickle.loads(pickle.dumps(tok))
  captions = _captions(7, 30)
  np.testing.assert_array_equal(
      copy.encode_batch(captions, training=True, rng=np.random.default_rng(2))[0],
      tok.encode_batch(captions, training=True, rng=np.random.default_rng(2))[0])


# --- The script -------------------------------------------------------------------------------


def _run_script(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "train_tokenizer.py"), *args],
      capture_output=True, text=True, check=False, cwd=REPO)


def test_script_trains_from_a_captions_file(tmp_path):
  captions_file = tmp_path / "captions.txt"
  captions_file.write_text("\n".join(_captions(8, 300)) + "\n", encoding="utf-8")
  out_dir = tmp_path / "out"
  result = _run_script(f"--captions_file={captions_file}", "--vocab_size=320", "--text_len=8",
                       f"--out_dir={out_dir}")
  assert result.returncode == 0, result.stderr
  assert "vocab_size: 320" in result.stdout
  assert "captions: 300" in result.stdout
  assert "truncated at text_len=8" in result.stdout
  assert sorted(os.listdir(out_dir)) == ["tokenizer.json", "tokenizer.model"]
  loaded = tokenizer_lib.Tokenizer.load(out_dir)
  assert (loaded.vocab_size, loaded.text_len) == (320, 8)


def test_script_trains_from_shapes(tmp_path):
  result = _run_script("--dataset=shapes", "--num_captions=200", "--vocab_size=300",
                       f"--out_dir={tmp_path}")
  assert result.returncode == 0, result.stderr
  assert "captions: 200" in result.stdout
  assert tokenizer_lib.Tokenizer.load(tmp_path).text_len == 256


def test_script_needs_exactly_one_caption_source(tmp_path):
  result = _run_script(f"--out_dir={tmp_path}")
  assert result.returncode != 0
  assert "captions_file" in result.stderr and "dataset" in result.stderr
