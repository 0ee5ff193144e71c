"""Captions to text tokens: a lowercased SentencePiece BPE with BPE-dropout and per-position pads.

DALL-E lowercases each caption, encodes it with BPE (vocab 16384, BPE-dropout 0.1 while training)
into at most 256 tokens, and fills each position that holds no text token with a pad token learned
separately for that position. Here the pad at position `i` has id `vocab_size + i`, so the text
embedding of the transformer has `num_text_tokens = vocab_size + text_len` rows.

The BPE model is a SentencePiece model (`model_type="bpe"`, byte fallback, no BOS/EOS). Eval
encoding is SentencePiece's own. Training encoding runs BPE-dropout here, over the model's pieces
and merge scores, drawing from the caller's `np.random.Generator`: SentencePiece's sampling draws
from a thread-local generator seeded through process-global state, and drops a merge for good once
it loses its coin, where Provilkov et al. (2020) draw every candidate afresh at each merge step.
"""

from __future__ import annotations

import heapq
import io
import json
import re
import unicodedata
from typing import Iterable, Iterator, Sequence

from etils import epath
import numpy as np
import sentencepiece as spm

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer.json"
FORMAT_VERSION = 1
DEFAULT_DROPOUT = 0.1
# SentencePiece reserves one <unk> piece and, with byte fallback, one piece per byte value.
NUM_RESERVED_PIECES = 1 + 256


def normalize_caption(caption: str, lowercase: bool = True) -> str:
  """The text a caption is encoded as: NFKC, lowercased, whitespace runs collapsed to one space."""
  text = unicodedata.normalize("NFKC", caption)
  if lowercase:
    text = text.lower()
  return " ".join(text.split())


def train_tokenizer(
    captions: Iterable[str],
    vocab_size: int,
    text_len: int,
    out_dir: str | None = None,
    *,
    dropout: float = DEFAULT_DROPOUT,
    character_coverage: float = 1.0,
    lowercase: bool = True,
) -> Tokenizer:
  """Trains a SentencePiece BPE on the captions, in memory; deterministic for the same captions.

  Args:
    captions: the training captions; each is normalized by `normalize_caption` first.
    vocab_size: number of BPE pieces, counting `<unk>` and the 256 byte pieces (paper: 16384).
    text_len: text positions per example (paper: 256).
    out_dir: if given, the tokenizer is saved there (`Tokenizer.save`).
    dropout: the BPE-dropout probability the tokenizer applies when encoding for training.
    character_coverage: fraction of characters that get their own piece; the rest fall back to
      bytes. 1.0 keeps every character seen (emoji, accents); web-scale data with many rare
      scripts may prefer 0.9995 so rare characters do not use up the vocabulary.
    lowercase: lowercase captions (the paper does).

  Returns:
    The trained tokenizer.
  """
  num_captions = 0

  def sentences() -> Iterator[str]:
    nonlocal num_captions
    for caption in captions:
      text = normalize_caption(caption, lowercase)
      if text:
        num_captions += 1
        yield text

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        # Unseen characters become UTF-8 byte pieces, so no caption ever maps to <unk>.
        byte_fallback=True,
        # normalize_caption already did NFKC, lowercasing and whitespace; keep the model exact.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        # No BOS/EOS; pads are per-position ids past the vocabulary, not a piece.
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        # Use every caption, unshuffled: sampling would tie the vocabulary to a seed.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=1,
    )
  except RuntimeError as e:
    explained = _explain_training_error(e, vocab_size, num_captions)
    if explained is None:
      raise
    raise explained from e
  tokenizer = Tokenizer(model.getvalue(), text_len, dropout=dropout, lowercase=lowercase)
  if out_dir is not None:
    tokenizer.save(out_dir)
  return tokenizer


def _explain_training_error(error: RuntimeError, vocab_size: int,
                            num_captions: int) -> ValueError | None:
  """SentencePiece's vocabulary-size errors as a ValueError that says what to do, else None."""
  message = str(error)
  if num_captions == 0:
    return ValueError("No non-empty captions to train the tokenizer on.")
  if match := re.search(r"Please set it to a value <= (\d+)", message):
    return ValueError(
        f"vocab_size={vocab_size} is more than {num_captions} captions can fill: BPE runs out of "
        f"merges at {match[1]} pieces. Pass vocab_size <= {match[1]}, or train on more captions "
        "(the paper's 16384 assumes millions of captions).")
  if match := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
    return ValueError(
        f"vocab_size={vocab_size} is too small: {NUM_RESERVED_PIECES} reserved pieces (<unk> and "
        f"256 bytes) plus one per distinct character need {match[1]}. Pass vocab_size >= "
        f"{match[1]}, or a character_coverage below 1.0 so rare characters fall back to bytes.")
  return None


class Tokenizer:
  """Lowercased BPE captions to `int32[text_len]` ids, padded with per-position pad ids.

  Ids `[0, vocab_size)` are BPE pieces; the pad at position `i` is `vocab_size + i`. Encoding is
  thread-safe; training encodings depend only on the caption and the `rng` passed in.
  """

  def __init__(
      self,
      model_proto: bytes,
      text_len: int,
      *,
      dropout: float = DEFAULT_DROPOUT,
      lowercase: bool = True,
  ):
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if text_len < 1:
      raise ValueError(f"text_len must be positive, got {text_len}")
    self._model_proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)
    self._bpe = _BpeDropout(self._sp)
    self.text_len = text_len
    self.dropout = dropout
    self.lowercase = lowercase
    self.vocab_size = self._sp.get_piece_size()
    self.num_text_tokens = self.vocab_size + text_len
    self.pad_ids = np.arange(self.vocab_size, self.num_text_tokens, dtype=np.int32)
    self.pad_ids.setflags(write=False)

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, text_len={self.text_len}, "
            f"dropout={self.dropout}, lowercase={self.lowercase})")

  def __reduce__(self) -> tuple:
    # Rebuilt from the model bytes in each input worker process.
    return (_rebuild, (self._model_proto, self.text_len, self.dropout, self.lowercase))

  @property
  def model_proto(self) -> bytes:
    """The serialized SentencePiece model (what `save` writes to `tokenizer.model`)."""
    return self._model_proto

  def pieces(self, caption: str) -> list[str]:
    """The BPE pieces of a caption without dropout, for inspection."""
    return self._sp.encode(normalize_caption(caption, self.lowercase), out_type=str)

  def encode(
      self,
      caption: str,
      *,
      training: bool = False,
      rng: np.random.Generator | None = None,
  ) -> tuple[np.ndarray, bool]:
    """Encodes one caption.

    Args:
      caption: any text; normalized by `normalize_caption`.
      training: apply BPE-dropout with probability `self.dropout`.
      rng: the generator dropout draws from; required when training with dropout > 0.

    Returns:
      `int32[text_len]` ids (text pieces, then pads), and whether the caption was truncated.
    """
    return self._pad(self._tokens(normalize_caption(caption, self.lowercase), training, rng))

  def encode_batch(
      self,
      captions: Sequence[str],
      *,
      training: bool = False,
      rng: np.random.Generator | None = None,
  ) -> tuple[np.ndarray, int]:
    """Encodes captions; returns `int32[batch, text_len]` ids and how many were truncated."""
    texts = [normalize_caption(c, self.lowercase) for c in captions]
    if self._uses_dropout(training, rng):
      token_lists = [self._bpe.encode(t, self.dropout, rng) for t in texts]
    else:
      token_lists = self._sp.encode(texts) if texts else []
    ids = np.tile(self.pad_ids, (len(texts), 1))
    num_truncated = 0
    for row, tokens in zip(ids, token_lists):
      _, truncated = self._pad(tokens, out=row)
      num_truncated += truncated
    return ids, num_truncated

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """`int[text_len]` ids back to (normalized) text; pad ids (>= vocab_size) are skipped."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
      raise ValueError(f"decode takes one sequence of ids, got shape {ids.shape}")
    return self._sp.decode([int(i) for i in ids if 0 <= i < self.vocab_size])

  def save(self, directory: epath.PathLike) -> None:
    """Writes `tokenizer.model` and `tokenizer.json` into `directory` (created if needed)."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MODEL_FILE).write_bytes(self._model_proto)
    config = dict(format_version=FORMAT_VERSION, vocab_size=self.vocab_size,
                  text_len=self.text_len, dropout=self.dropout, lowercase=self.lowercase)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

  @classmethod
  def load(cls, directory: epath.PathLike, dropout: float | None = None) -> Tokenizer:
    """Reads a tokenizer written by `save`; `dropout` overrides the saved probability."""
    paths = {name: epath.Path(directory) / name for name in (MODEL_FILE, CONFIG_FILE)}
    for name, path in paths.items():
      if not path.is_file():
        raise FileNotFoundError(
            f"No tokenizer in {directory}: {name} is missing (expected {path}; "
            "Tokenizer.save or experiments/train_tokenizer.py writes it).")
    config = json.loads(paths[CONFIG_FILE].read_text(encoding="utf-8"))
    if config.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{paths[CONFIG_FILE]} has format_version {config.get('format_version')}; "
                       f"this code reads version {FORMAT_VERSION}.")
    model_proto = paths[MODEL_FILE].read_bytes()
    tokenizer = cls(model_proto, config["text_len"],
                    dropout=config["dropout"] if dropout is None else dropout,
                    lowercase=config["lowercase"])
    if tokenizer.vocab_size != config["vocab_size"]:
      raise ValueError(f"{paths[MODEL_FILE]} has {tokenizer.vocab_size} pieces but "
                       f"{paths[CONFIG_FILE]} says vocab_size={config['vocab_size']}.")
    return tokenizer

  def _uses_dropout(self, training: bool, rng: np.random.Generator | None) -> bool:
    if not training or self.dropout == 0.0:
      return False
    if rng is None:
      raise ValueError("encode(training=True) needs an rng: BPE-dropout draws from it, so that "
                       "the encoding is reproducible.")
    return True

  def _tokens(self, text: str, training: bool, rng: np.random.Generator | None) -> list[int]:
    if self._uses_dropout(training, rng):
      return self._bpe.encode(text, self.dropout, rng)
    return self._sp.encode(text)

  def _pad(self, tokens: Sequence[int], out: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """Writes up to `text_len` tokens over the pad ids; returns `int32[text_len]`, truncated."""
    ids = self.pad_ids.copy() if out is None else out
    n = min(len(tokens), self.text_len)
    ids[:n] = tokens[:n]
    return ids, len(tokens) > self.text_len


def _rebuild(model_proto: bytes, text_len: int, dropout: float, lowercase: bool) -> Tokenizer:
  return Tokenizer(model_proto, text_len, dropout=dropout, lowercase=lowercase)


class _BpeDropout:
  """BPE with dropout (Provilkov et al. 2020, Algorithm 1) over a SentencePiece BPE model.

  With dropout 0 this is SentencePiece's own BPE encoder: normalize, split into characters, merge
  the adjacent pair whose concatenation is the best-scoring piece (leftmost on ties), repeat; then
  map characters without a piece to byte pieces.
  """

  def __init__(self, sp: spm.SentencePieceProcessor):
    self._sp = sp
    self._pieces: dict[str, tuple[int, float]] = {}  # normal piece -> (id, score)
    for i in range(sp.get_piece_size()):
      if sp.is_unused(i):
        raise ValueError("SentencePiece models with unused pieces are not supported.")
      if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)):
        self._pieces[sp.id_to_piece(i)] = (i, sp.get_score(i))
    self._byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    if any(sp.is_unknown(i) for i in self._byte_ids):
      raise ValueError("The SentencePiece model needs byte_fallback=True.")

  def encode(self, text: str, dropout: float, rng: np.random.Generator) -> list[int]:
    """Piece ids of normalized `text`, each candidate merge dropped with probability `dropout`."""
    # Same normalizer as SentencePiece's encode: dummy prefix, spaces escaped as U+2581.
    symbols = list(self._sp.normalize(text))
    n = len(symbols)
    if n == 0:
      return []
    prev = list(range(-1, n - 1))
    next_ = list(range(1, n + 1))
    next_[-1] = -1
    # Entries (-score, left, right, length): best score first, then leftmost, as SentencePiece.
    agenda: list[tuple[float, int, int, int]] = []

    def add_pair(left: int, right: int) -> None:
      if left >= 0 and right >= 0:
        piece = symbols[left] + symbols[right]
        if (entry := self._pieces.get(piece)) is not None:
          heapq.heappush(agenda, (-entry[1], left, right, len(piece)))

    for i in range(1, n):
      add_pair(i - 1, i)
    dropped = []
    while agenda:
      pair = heapq.heappop(agenda)
      _, left, right, length = pair
      # Symbols only grow or empty, so an unchanged total length means an unchanged pair.
      if not symbols[left] or not symbols[right] or (
          len(symbols[left]) + len(symbols[right]) != length):
        continue
      if dropout > 0.0 and rng.random() < dropout:
        dropped.append(pair)
        continue
      symbols[left] += symbols[right]
      symbols[right] = ""
      next_[left] = next_[right]
      if next_[right] >= 0:
        prev[next_[right]] = left
      # Algorithm 1 draws every candidate afresh at each merge step: requeue this step's losers.
      for loser in dropped:
        heapq.heappush(agenda, loser)
      dropped.clear()
      add_pair(prev[left], left)
      add_pair(left, next_[left])
    # When all remaining candidates lost their coin in one step, Algorithm 1 stops here.

    ids = []
    i = 0
    while i >= 0:
      if (entry := self._pieces.get(symbols[i])) is not None:
        ids.append(entry[0])
      else:
        ids.extend(self._byte_ids[b] for b in symbols[i].encode("utf-8"))
      i = next_[i]
    return ids
